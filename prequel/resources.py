"""What prequel ships besides code: the configs and the bundled corpus.

Installed, they are package data inside `prequel/` (pyproject.toml maps them there); in a checkout
they stay at the top of the repository, beside `prequel/`. `shipped` finds them either way.
"""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def shipped(*parts: str) -> Path:
    """A shipped file or folder, e.g. ``shipped("configs", "small.yaml")``."""
    for base in (_PACKAGE, _PACKAGE.parent):  # installed, then a checkout
        if (base / parts[0]).is_dir():
            return base.joinpath(*parts)
    raise FileNotFoundError(f"prequel's {parts[0]}/ is neither in {_PACKAGE} nor beside it (a broken install?)")


def config_path(name: str | Path) -> Path:
    """A config file as given; else, for ``configs/...`` that is not there, the shipped one, so
    ``prequel --config configs/small.yaml`` works from any directory (a file of that name here wins)."""
    path = Path(name)
    if path.exists() or path.is_absolute() or path.parts[:1] != ("configs",):
        return path
    packaged = shipped(*path.parts)
    return packaged if packaged.exists() else path


CONFIGS = shipped("configs")
BUNDLED_CORPUS = shipped("data", "tinyshakespeare.txt")
