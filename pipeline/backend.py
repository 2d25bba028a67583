"""Which path renders a photo, on which device, and the one way back to the CPU path.

    numpy (the CPU path)     photo.prepare -> SceneModels.predict -> photo.render_on_host
    torch (the device path)  device_render.render_on_device: bytes to bytes on a torch device

`render_backend_for` picks the path, `model_device` the device, and `device_results` runs the
device path over a batch and says, for each photo it did not render, why it takes the CPU path
instead. The library job's model actor and `dreamfocus render` both go through these, so a photo
takes the same path, and falls back for the same reasons, in both.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from .models.base import default_device
from .photo import Finished, RenderSettings, SceneMaps, SceneModels

log = logging.getLogger(__name__)

RENDER_BACKENDS = ("auto", "numpy", "torch")
NUMPY_PATH = "numpy"  # the render_path of a photo rendered on the host (the device path's: torch_path)


def model_device(choice: str | None) -> str:
    """Where the models (and the torch render backend) run: the device asked for, else a GPU
    where there is one."""
    return choice or default_device()


def render_backend_for(choice: str, device: str) -> str:
    """The render backend that runs: "numpy" or "torch"; auto picks torch on a GPU only (on CPUs
    the NumPy/OpenCV effect is the quicker of the two)."""
    if choice == "auto":
        return "torch" if device.startswith("cuda") else "numpy"
    return choice


def torch_path(device: str) -> str:
    """The render_path a manifest row records for the device path, e.g. "torch:cuda"."""
    return f"torch:{device.split(':')[0]}"


def device_results(
    datas: Sequence[bytes],
    settings: RenderSettings,
    device: str,
    models: SceneModels | None = None,
    maps: Sequence[SceneMaps] | None = None,
) -> list[Finished | str]:
    """The device path over a batch: each photo's Finished, or why it takes the CPU path (the
    device path cannot take it, or failed on it). A batch that fails is tried again one photo
    at a time, so a photo that breaks the batch goes to the CPU path alone."""
    from .device_render import render_on_device

    def on_device(rows: list[int]) -> list[Finished | str]:
        chosen = None if maps is None else [maps[i] for i in rows]
        return render_on_device([datas[i] for i in rows], settings, device, models=models, maps=chosen)

    try:
        return on_device(list(range(len(datas))))
    except Exception:  # noqa: BLE001 - one by one, so a photo that breaks the batch goes alone
        log.warning("device path failed on a batch of %d; retrying one by one", len(datas), exc_info=True)
        release_device_cache()
    results: list[Finished | str] = []
    for i in range(len(datas)):
        try:
            results.extend(on_device([i]))
        except Exception as exc:  # noqa: BLE001 - the CPU path is still open to it
            results.append(f"the device path failed ({type(exc).__name__}: {exc})")
    return results


def release_device_cache() -> None:
    """After a CUDA out-of-memory, give cached blocks back before the smaller retries."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
