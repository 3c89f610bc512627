"""Import ``aiokvpipe._wire`` and ``aiokvpipe._handshake`` without running
``aiokvpipe/__init__.py`` (which imports torch): a hand-speaking peer process then starts in
~50 ms instead of ~2 s. Import this module first, before anything imports ``aiokvpipe``.

Only for helper processes: inside pytest ``aiokvpipe`` is already imported normally, and this
is a no-op.
"""

from __future__ import annotations

import importlib.util
import sys
import types

if "aiokvpipe" not in sys.modules:
    _spec = importlib.util.find_spec("aiokvpipe")
    assert _spec is not None and _spec.submodule_search_locations is not None
    _pkg = types.ModuleType("aiokvpipe")
    _pkg.__path__ = list(_spec.submodule_search_locations)
    sys.modules["aiokvpipe"] = _pkg
