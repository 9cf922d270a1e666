"""Train a matsciml task from YAML configs (the same program as the ``matsciml-train`` command).

Example::

    python experiments/training_script.py -e experiments/configs/experiments/devset_energy.yaml \\
        -t experiments/configs/trainer/devset_cpu.yaml

See ``docs/runner.rst`` for the config files and options.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import matsciml  # noqa: F401
except ImportError:  # run from a source checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matsciml.runner.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
