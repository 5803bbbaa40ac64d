"""``python -m benchmarks``: the losses against their references (:mod:`benchmarks.losses`); see
``python -m benchmarks --help``. The fused linear losses have their own:
``python -m benchmarks.fused_linear``.
"""

from benchmarks.losses import main

if __name__ == "__main__":
    main()
