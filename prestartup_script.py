"""ComfyUI runs this before it imports its own modules and nodes: the worker group starts now, in the
background, and is ready sooner (comfy_xdit_patch/driver/prestart.py). Never raises."""
import os
import sys

_root = os.path.dirname(os.path.abspath(__file__))
if _root not in sys.path:
    sys.path.insert(0, _root)
try:
    from comfy_xdit_patch.driver import prestart

    prestart.start()
except Exception as e:  # the hooks attach as usual, and say what is wrong
    print(f"comfy_xdit_patch: no early start ({type(e).__name__}: {e})", file=sys.stderr)
