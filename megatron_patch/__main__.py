"""``python -m megatron_patch SCRIPT [ARGS...]``: run a Megatron-LM script (e.g. ``pretrain_gpt.py``)
after ``megatron_patch.apply()``, so it accepts ``--ring-attention`` and the ``--ring-*`` flags.

Works under ``torchrun`` too: ``torchrun --nproc-per-node 8 -m megatron_patch pretrain_gpt.py ...``.

``python -m megatron_patch check [PATH_TO_MEGATRON_LM]``: build a tiny GPT through that checkout's
``pretrain_gpt.py`` on CPU with and without ``--ring-attention`` and report what took effect.
"""

import os
import runpy
import sys


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    if sys.argv[1] == "check":
        from megatron_patch.check import main as check

        sys.exit(check(sys.argv[2:]))
    script = sys.argv[1]
    if not os.path.isfile(script):
        sys.exit(f"megatron_patch: {script!r} is not a file: pass the path of Megatron-LM's pretrain_gpt.py")
    from megatron_patch import apply

    apply()
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # the script's own imports (gpt_builders, ...)
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
