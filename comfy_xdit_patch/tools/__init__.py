"""Tools around the runtime, never imported by it: the `comfy-xdit` command (demo, bench, doctor,
env-table), a headless ComfyUI server runner, synthetic FLUX weights, plots and profiling helpers."""
