"""Load the spec: an explicit file, else $OISP_SPEC, else the bundled JSON."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

from oisp.spec.model import Spec

SPEC_ENV = "OISP_SPEC"
BUNDLED_NAME = "ai_endpoints.json"


def load_spec(path: str | os.PathLike[str] | None = None) -> Spec:
    """Read a spec. ``path`` wins over ``$OISP_SPEC``, which wins over the bundled file."""
    chosen = path or os.environ.get(SPEC_ENV)
    if chosen:
        text = Path(chosen).read_text(encoding="utf-8")
    else:
        text = resources.files("oisp.spec").joinpath(BUNDLED_NAME).read_text(encoding="utf-8")
    return Spec.from_dict(json.loads(text))


@lru_cache(maxsize=1)
def default_spec() -> Spec:
    """The spec as configured by the environment, parsed once per process."""
    return load_spec()
