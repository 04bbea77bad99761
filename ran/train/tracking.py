"""W&B facts every command shares: whether to log online or offline, fresh run ids, and the run id a W&B
sweep agent gives the trial it starts."""

from __future__ import annotations

import netrc
import os
import secrets
import string
from typing import Literal
from urllib.parse import urlparse

__all__ = ["new_wandb_id", "sweep_run_id", "wandb_has_credentials", "wandb_mode"]


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


def sweep_run_id() -> str | None:
    """The run id of this process's W&B sweep trial, or None outside a sweep.

    `wandb agent` starts each trial with WANDB_SWEEP_ID and WANDB_RUN_ID set (wandb/wandb_agent.py), and
    inside a sweep `wandb.init` ignores the id, project and entity it is passed and takes these
    (wandb/sdk/wandb_init.py, clear_run_path_if_sweep_or_launch): the trial's id is WANDB_RUN_ID.
    """
    if not os.environ.get("WANDB_SWEEP_ID"):
        return None
    return os.environ.get("WANDB_RUN_ID") or None
