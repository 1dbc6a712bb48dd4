"""`repro bench`: the harness's speed, each row a ratio against a plain baseline measured in the same run.

`cpu` holds the CPU rows (`repro bench`), `gpu` the GPU rows (`repro bench --device cuda`), `common` what both use.
"""
