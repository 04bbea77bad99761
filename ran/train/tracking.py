"""W&B facts every command shares: whether to log online or offline, and fresh run ids."""

from __future__ import annotations

import netrc
import os
import secrets
import string
from typing import Literal
from urllib.parse import urlparse

__all__ = ["new_wandb_id", "wandb_has_credentials", "wandb_mode"]


def wandb_has_credentials() -> bool:
    """An API key in WANDB_API_KEY or a ~/.netrc (or $NETRC) entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode() -> Literal["online", "offline", "disabled"]:
    """WANDB_MODE if set ('dryrun' counts as offline), else online with credentials and offline without."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("online", "offline", "disabled"):
        return mode  # type: ignore[return-value]
    if mode == "dryrun":
        return "offline"
    return "online" if wandb_has_credentials() else "offline"


def new_wandb_id() -> str:
    """A fresh W&B run id (8 lowercase letters and digits, W&B's own format)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
