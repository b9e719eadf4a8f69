"""``ivpt app``: a local web page to explore a trained model and switch its concepts off.

- :mod:`ivpt.app.session`: the model, its test set, explanations under an intervention, concept
  galleries (no web code);
- :mod:`ivpt.app.ui`: the Gradio page (an optional extra: ``pip install 'ivpt[app]'``).
"""

from __future__ import annotations

from pathlib import Path

from ivpt.app.session import ExplorerSession, LoadedModel, load_model
from ivpt.app.ui import DEFAULT_HOST, DEFAULT_PORT, RunningApp, import_gradio, launch_app


def run_app(
    checkpoint: str | Path,
    *,
    data: str | Path | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    device: str | None = None,
    top_k: int = 6,
    block: bool = True,
) -> RunningApp:
    """What ``ivpt app`` runs: load the model, open its test set, serve the page.

    Args:
        checkpoint: a checkpoint file written by ``ivpt train``, a folder written by ``ivpt export``, or an
            ``hf-hub:`` id.
        data: the data set's folder (default: the one in the model's config, when it exists).
        host, port: where to listen (127.0.0.1 by default: this machine only).
        device: ``"cuda"`` when available unless given.
        top_k: typical crops per concept in the galleries.
        block: serve until interrupted; ``False`` returns the running app.

    Raises:
        IVPTError: gradio is missing (checked first), or the model, data set or port is unusable.
    """
    import_gradio()
    session = ExplorerSession(load_model(checkpoint, device=device), data, top_k=top_k)
    return launch_app(session, host=host, port=port, block=block)


__all__ = ["ExplorerSession", "LoadedModel", "RunningApp", "launch_app", "load_model", "run_app"]
