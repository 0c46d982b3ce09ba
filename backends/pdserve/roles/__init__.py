"""Triton role adapters: router, prefill, decode, aggregated.

Only ``pdserve.roles.triton`` and the role classes built on it import
``triton_python_backend_utils``; the contracts and request conversion modules
here are plain Python and tested without Triton.
"""

from __future__ import annotations
