"""The GPU paths (`pytest -m cuda`; skipped, with the reason shown, where no CUDA device is visible).

- a smoke run through every data backend present scores like the same run on the CPU: synthetic 4-class data,
  val top-1 error within SMOKE_TOL percentage points (the GPU run is bf16, the CPU run fp32, and the two see
  different dropout masks, so they are not the same run; both learn the classes to well under 25% error);
- one fp32 training step of alexnet-paper agrees between CPU and GPU to 1e-4 relative (TF32 off);
- LRN's gradient passes finite differences on the device; under bf16 autocast it runs and stays within bf16
  rounding of float64;
- bf16 autocast, channels_last and torch.compile each train a few hundred steps to a finite, falling loss;
- DistributedDataParallel on nccl at world size 1 gives the plain model's step;
- ten-crop evaluation on the GPU gives the CPU's outputs;
- every backend cuts the same crops for the same (seed, epoch, index) on the GPU as on the CPU: exactly from raw
  betons, and for nvjpeg from JPEGs within the decoders' tolerance (nvJPEG against libjpeg-turbo);
- nothing makes the host wait for the GPU while an epoch trains: every backend hands mean-image batches over, and
  the loop runs its steps, under torch's sync debug mode set to "error" (any synchronising call raises);
- torch.compile is on by default on CUDA (the smoke run's record says so).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from repro.config import RunConfig, apply_overrides

# The device under test; REPRO_TEST_DEVICE=cpu runs the same checks against the CPU, to try the tests themselves
# on a machine without a GPU (a plumbing check, not a GPU result).
DEVICE = os.environ.get("REPRO_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                 reason="no CUDA device visible; these tests run on a GPU machine "
                                 "(`pytest -m cuda`, or scripts/gpu-check)")]

SMOKE_TOL = 10.0                # percentage points of val top-1 error, GPU (bf16) against CPU (fp32)
STEP_RTOL = 1e-4                # one fp32 step, CPU against GPU (CPU fp32 against fp64: 1.9e-5 for the gradient)
# levels, nvJPEG against libjpeg-turbo: mean and 99th percentile of |difference|. Both use an exact IDCT but may
# upsample the 4:2:0 chroma differently (libjpeg-turbo interpolates), which moves pixels at colour edges.
NVJPEG_MEAN_TOL, NVJPEG_P99_TOL = 3.0, 24.0
BACKENDS = ["nvjpeg", "torch"] + (["ffcv"] if importlib.util.find_spec("ffcv") else [])


def _prepare(folder, write_mode: str, res: int, per_class: int):
    if importlib.util.find_spec("ffcv") is None:
        pytest.skip("FFCV is not installed: betons cannot be written here (scripts/gpu-check installs the wheel "
                    "from .whl/)")
    from data_prep.prepare import PrepareOptions, prepare

    prepare("synthetic", None, folder, PrepareOptions(res=res, classes="4", train_per_class=per_class,
                                                      val_per_class=20, write_mode=write_mode), progress=False)
    return folder


@pytest.fixture(scope="module")
def jpg_dir(tmp_path_factory):
    return _prepare(tmp_path_factory.mktemp("cuda-jpg"), "jpg", 64, 60)


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    return _prepare(tmp_path_factory.mktemp("cuda-raw"), "raw", 64, 20)


def small_run(data_dir, **overrides) -> RunConfig:
    """The four-layer net on 56 px crops of the 64 px synthetic images; He init, mean/std-normalised pixels and
    lr 0.003 take it to 0% error in four epochs on the CPU (with the paper's init it stays at chance this short)."""
    base = {"data.dir": str(data_dir), "model.name": "cifar4", "model.num_classes": 4, "model.input_size": 56,
            "model.init": "kaiming", "data.normalize": "mean-std", "train.lr": 0.003, "train.epochs": 4,
            "train.batch_size": 16, "train.schedule": "constant", "train.log_every": 10, "train.ten_crop": False,
            "data.workers": 4}
    return apply_overrides(RunConfig(), {**base, **overrides})


@pytest.fixture
def exact_fp32():
    """TF32 off (cuDNN convolutions use it by default in fp32), restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory, jpg_dir):
    from repro.engine import fit

    return fit(small_run(jpg_dir, **{"data.backend": "torch", "train.device": "cpu"}),
               tmp_path_factory.mktemp("cpu-run"), progress=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_smoke_run_scores_like_the_cpu(tmp_path, jpg_dir, cpu_run, backend):
    from repro.engine import fit

    cpu = cpu_run.to_dict()
    compile = "auto" if backend == "nvjpeg" else "false"  # compiled once: the default on CUDA
    gpu = fit(small_run(jpg_dir, **{"data.backend": backend, "train.device": DEVICE, "train.compile": compile}),
              tmp_path / "gpu", progress=False).to_dict()
    assert cpu["status"] == gpu["status"] == "done", (cpu["error"], gpu["error"])
    assert gpu["provenance"]["compile"] == ("on" if compile == "auto" and DEVICE == "cuda" else "off")
    assert gpu["provenance"]["data_backend"] == backend and "cuda" not in cpu["provenance"]["device"].lower()
    assert cpu["metrics"]["top1_err"] < 25 and gpu["metrics"]["top1_err"] < 25
    assert abs(gpu["metrics"]["top1_err"] - cpu["metrics"]["top1_err"]) <= SMOKE_TOL


def test_one_fp32_step_agrees_between_cpu_and_gpu(exact_fp32):
    """alexnet-paper (dropout off: the two devices draw different masks), one SGD step with momentum and weight
    decay: the loss, the whole gradient and the whole update agree. Compared as whole vectors: a layer whose
    gradient is tiny and the sum of cancelling terms can differ more in relative terms without mattering."""
    from repro.models import build_model

    cfg = apply_overrides(RunConfig(), {"model.num_classes": 10, "model.dropout": 0.0})
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 3, 224, 224, generator=gen) * 255 - 120, torch.randint(0, 10, (4,), generator=gen)

    def flat(tensors):
        return torch.cat([t.detach().cpu().flatten() for t in tensors])

    results = {}
    for device in ("cpu", DEVICE):
        torch.manual_seed(0)
        model = build_model(cfg.model).to(device)
        before = flat(model.parameters())
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        loss = torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        grads = flat(p.grad for p in model.parameters())
        opt.step()
        results[device] = (loss.item(), grads, flat(model.parameters()) - before)
    (loss_c, grads_c, update_c), (loss_g, grads_g, update_g) = results["cpu"], results[DEVICE]
    assert loss_g == pytest.approx(loss_c, rel=STEP_RTOL)
    assert grads_c.norm() > 0
    for a, b in ((grads_c, grads_g), (update_c, update_g)):
        assert ((a - b).norm() / a.norm()).item() < STEP_RTOL


@pytest.mark.parametrize("towers", [1, 2])
def test_lrn_gradient_and_bf16_step_on_the_gpu(towers):
    """LRN's written-out gradient against finite differences on the device (float64); under bf16 autocast, its
    forward and backward run (the window sum was bf16 and the power float32, and the backward's convolution
    failed on the mixed dtypes) and agree with float64 on the same bf16 input within bf16's rounding of the
    result (2^-8) plus TF32's of the window sum."""
    from repro.models.layers import LRN

    lrn = LRN(alpha_mode="paper", towers=towers)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 8, 3, 3, dtype=torch.float64, generator=gen) * 60).to(DEVICE).requires_grad_(True)
    assert torch.autograd.gradcheck(lrn, (x,), eps=1e-4, atol=1e-7, rtol=1e-5)
    a = torch.relu(torch.randn(4, 96, 27, 27, generator=gen) * 100).to(DEVICE, torch.bfloat16)
    g = torch.randn(a.shape, generator=gen).to(DEVICE, torch.bfloat16)
    want_x = a.double().requires_grad_(True)
    want = LRN(towers=towers)(want_x)
    want.backward(g.double())
    got_x = a.clone().requires_grad_(True)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        got = LRN(towers=towers)(got_x)
    got.backward(g)
    assert got.dtype == got_x.grad.dtype == torch.bfloat16
    shown = a > 1
    assert (want.detach() / a.double())[shown].std() > 0.03  # the normalisation matters at these activations
    assert ((got.double() - want).abs() / want.abs())[shown].max() <= 2.0**-8 + 2e-3
    assert (got_x.grad.double() - want_x.grad).norm() / want_x.grad.norm() < 2.0**-8 + 2e-3


@pytest.mark.parametrize("switch", ["train.precision=bf16", "train.channels_last=true", "train.compile=true"])
def test_speed_switch_trains_to_a_falling_loss(tmp_path, jpg_dir, switch):
    from repro.engine import fit

    key, value = switch.split("=")
    others = {"train.precision": "fp32", "train.channels_last": "false", "train.compile": "false"}
    cfg = small_run(jpg_dir, **{**others, key: value, "data.backend": "nvjpeg", "train.device": DEVICE,
                                "train.epochs": 14, "train.max_iters": 200})
    record = fit(cfg, tmp_path / "run", progress=False)
    assert record.status == "done" and record.iterations == 200, record.error
    losses = [json.loads(line)["train_loss"] for line in (tmp_path / "run" / "curve.jsonl").read_text().splitlines()]
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_on_nccl_world_size_1():
    code = textwrap.dedent("""
        import torch, torch.distributed as dist
        from repro.config import RunConfig, apply_overrides
        from repro.engine import parallel
        from repro.models import build_model
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        on_gpu = DEVICE == "cuda"
        dist.init_process_group("nccl" if on_gpu else "gloo", rank=0, world_size=1)
        device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
        cfg = apply_overrides(RunConfig(), {"model.name": "cifar4", "model.num_classes": 4, "model.stem": "tiny",
                                            "model.input_size": 32, "model.dropout": 0.0})
        x, y = torch.randn(8, 3, 32, 32, device=device), torch.randint(0, 4, (8,), device=device)
        params = []
        for wrapped in (False, True):
            torch.manual_seed(0)
            model = build_model(cfg.model).to(device)
            net = parallel.wrap(model, device) if wrapped else model
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            for _ in range(3):
                loss = torch.nn.functional.cross_entropy(net(x), y)
                opt.zero_grad(); loss.backward(); opt.step()
            params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert dist.get_backend() == ("nccl" if on_gpu else "gloo")
        assert torch.allclose(params[0], params[1], rtol=1e-5, atol=1e-6), (params[0] - params[1]).abs().max()
        assert parallel.all_sum(torch.ones(3, device=device)).tolist() == [1.0, 1.0, 1.0]
        dist.destroy_process_group()
        print("ok")
    """)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    out = subprocess.run([sys.executable, "-c", f"DEVICE = {DEVICE!r}\n" + code], capture_output=True, text=True,
                         timeout=240, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_ten_crop_evaluation_on_the_gpu(raw_dir, exact_fp32):
    from repro.data import make_loaders
    from repro.data.augment import BatchTransform
    from repro.engine import predict
    from repro.models import build_model

    cfg = small_run(raw_dir, **{"data.backend": "torch"})
    outs = {}
    for device in ("cpu", DEVICE):
        torch.manual_seed(0)
        model = build_model(cfg.model).to(device).eval()
        loaders = make_loaders(cfg, device=device)
        logits, labels = predict(model, loaders.val, BatchTransform(loaders.manifest, cfg, train=False),
                                 crop=cfg.model.input_size, ten_crop=True)
        outs[device] = logits.float().cpu(), labels.cpu()
    assert outs["cpu"][0].shape == (80, 4)
    assert torch.equal(outs["cpu"][1], outs[DEVICE][1])
    torch.testing.assert_close(outs[DEVICE][0], outs["cpu"][0], rtol=1e-4, atol=1e-5)


def _train_epoch(folder, backend: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    from repro.data import make_loaders

    loaders = make_loaders(small_run(folder, **{"data.backend": backend, "train.seed": 3}), device=device)
    loaders.set_epoch(2)
    xs, ys = zip(*[(x.cpu().clone(), y.cpu().clone()) for x, y in loaders.train])
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_crops_on_gpu_and_cpu(raw_dir, backend):
    x_cpu, y_cpu = _train_epoch(raw_dir, backend, "cpu")
    x_gpu, y_gpu = _train_epoch(raw_dir, backend, DEVICE)
    assert torch.equal(y_cpu, y_gpu) and torch.equal(x_cpu, x_gpu)


def test_nvjpeg_on_the_gpu_decodes_like_the_cpu(jpg_dir):
    """The ffcv and torch backends decode on the host whatever the device; nvjpeg's decoder changes with it."""
    x_cpu, y_cpu = _train_epoch(jpg_dir, "nvjpeg", "cpu")
    x_gpu, y_gpu = _train_epoch(jpg_dir, "nvjpeg", DEVICE)
    assert torch.equal(y_cpu, y_gpu)
    diff = (x_gpu.float() - x_cpu.float()).abs().flatten()
    assert diff.mean() <= NVJPEG_MEAN_TOL and diff.quantile(0.99) <= NVJPEG_P99_TOL
    # and the windows are in the same place: one pixel off is much further away than the decoders are apart
    shifted = (x_gpu[..., 1:].float() - x_cpu[..., :-1].float()).abs().mean()
    assert shifted > 2 * diff.mean()


@pytest.fixture
def sync_errors():
    """torch's sync debug mode: any call that makes the host wait for the GPU raises (`on()`), until `off()`."""
    if DEVICE != "cuda":
        pytest.skip("sync debug mode is CUDA's")
    modes = {"on": lambda: torch.cuda.set_sync_debug_mode("error"),
             "off": lambda: torch.cuda.set_sync_debug_mode("default")}
    yield modes
    modes["off"]()


@pytest.mark.parametrize("backend", BACKENDS)
def test_loaders_hand_batches_over_without_a_sync(raw_dir, backend, sync_errors):
    """Mean-image training batches: the crop windows, drawn on the host, go to the GPU from pinned memory without
    blocking; the nvjpeg reader's batches reach the training stream through an event."""
    from repro.data import make_loaders

    loaders = make_loaders(small_run(raw_dir, **{"data.backend": backend, "data.normalize": "mean-image"}),
                           device=DEVICE)
    for epoch in range(2):  # the second epoch's first batches were read ahead (nvjpeg)
        loaders.set_epoch(epoch)
        batches = iter(loaders.train)
        next(batches)  # the first batch of a pass starts workers and pinned pools
        sync_errors["on"]()
        n = sum(1 for x, y in batches)
        sync_errors["off"]()
        assert n == loaders.batches_per_epoch - 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_steps_do_not_wait_for_the_gpu(tmp_path, raw_dir, backend, sync_errors, monkeypatch):
    """From each epoch's third step to its end (cuDNN's search and the first batches may sync before), the loop and
    the loader run with syncs as errors; the epoch's end, where the loop reads its sums on purpose, without."""
    from repro.engine import fit
    from repro.engine import train as train_mod

    monkeypatch.setattr(train_mod, "CURVE_SYNC_STEPS", 10**9)  # no sync inside an epoch
    real_step, real_synced = train_mod._step, train_mod._synced

    def step(state, *a, **k):
        out = real_step(state, *a, **k)
        if state.batch >= 1:
            sync_errors["on"]()
        return out

    def synced(*a, **k):
        sync_errors["off"]()
        return real_synced(*a, **k)

    monkeypatch.setattr(train_mod, "_step", step)
    monkeypatch.setattr(train_mod, "_synced", synced)
    cfg = small_run(raw_dir, **{"data.backend": backend, "data.normalize": "mean-image", "train.device": DEVICE,
                                "train.compile": "false", "train.epochs": 2})
    record = fit(cfg, tmp_path / "run", progress=False)
    assert record.status == "done" and record.iterations == 2 * 80 // 16, record.error

