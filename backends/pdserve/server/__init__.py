"""Running pdserve under Triton: instance config, repository generation, launcher.

Nothing here imports ``triton_python_backend_utils``; it is all testable offline.
"""

from __future__ import annotations
