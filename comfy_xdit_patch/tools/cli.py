"""comfy-xdit: demo (the default job), bench, bench-vae, first-image, doctor, env-table."""
from __future__ import annotations

import argparse
import re
import sys

# A generated table sits right below its marker, e.g. `<!-- env-table: user (generated ...) -->`.
_TABLE = re.compile(r"(<!-- env-table: (\w+).*?-->\n)((?:\|.*(?:\n|$))*)")


def env_tables(text: str) -> str:
    """`text` with every marked variable table regenerated from config.ENV_VARS for its audience."""
    from .. import config

    if not _TABLE.search(text):
        raise ValueError("no `<!-- env-table: AUDIENCE -->` marker")
    return _TABLE.sub(lambda m: m.group(1) + config.markdown_table(m.group(2)) + "\n", text)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own options (see bench.py)
        from . import bench

        return bench.main(argv[1:])
    if argv[:1] == ["bench-vae"]:  # its own options (see bench_vae.py)
        from . import bench_vae

        return bench_vae.main(argv[1:])
    if argv[:1] == ["first-image"]:  # its own options (see first_image.py)
        from . import first_image

        return first_image.main(argv[1:])
    ap = argparse.ArgumentParser(prog="comfy-xdit", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run a FLUX text-to-image workflow headless, plugin off and on")
    d.add_argument("--checkpoint", help="an all-in-one FLUX checkpoint (diffusion model + text encoders + VAE)")
    d.add_argument("--unet", help="a FLUX diffusion-model file (conditioning is then synthetic)")
    d.add_argument("--size", type=int, help="image width = height (default 1024 on GPU, 256 on CPU)")
    d.add_argument("--steps", type=int, help="sampling steps (default 20 on GPU, 8 on CPU)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--workers", type=int, help="ranks (default: all GPUs; 2 on CPU)")
    d.add_argument("--workdir", default="~/.cache/comfy_xdit_patch/demo", help="ComfyUI base directory to use")
    sub.add_parser("bench", help="side-by-side benchmark: unpatched 1 GPU vs patched N ranks (bench --help)")
    sub.add_parser("bench-vae", help="the VAE decode alone: ComfyUI's against the ranks' (bench-vae --help)")
    sub.add_parser("first-image", help="time from starting ComfyUI to the first image: alone, plugin cold and "
                                       "warm restart, a new resolution (first-image --help)")
    doc = sub.add_parser("doctor", help="what the plugin finds on this machine; exit 1 on problems")
    doc.add_argument("--no-ray", action="store_true", help="don't start a private Ray cluster to check it")
    t = sub.add_parser("env-table", help="print an environment-variable table (user: README.md; tuning, "
                                         "diagnostics: docs/configuration.md)")
    t.add_argument("--audience", default="user", choices=("user", "tuning", "diagnostics"))
    t.add_argument("--write", metavar="FILE",
                   help="instead regenerate every table in FILE below an `<!-- env-table: AUDIENCE -->` marker")
    a = ap.parse_args(argv)
    if a.cmd == "demo":
        from . import demo

        return demo.run(a)
    if a.cmd == "doctor":
        from . import doctor

        return doctor.run(a)
    from .. import config

    if not a.write:
        print(config.markdown_table(a.audience))
        return 0
    with open(a.write) as f:
        text = f.read()
    with open(a.write, "w") as f:
        f.write(env_tables(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
