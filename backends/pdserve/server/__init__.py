"""Running pdserve under Triton: instance config, repository generation, launcher.

Nothing here imports the Triton Python utilities; it is all testable offline.
"""

from __future__ import annotations
