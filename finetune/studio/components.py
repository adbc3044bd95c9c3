"""Two gradio components with a safer or more honest server side than the stock ones; the browser
gets the stock Image and Label.

* `image_upload`: an Image whose handler gets the uploaded (pasted, webcam) file's path, the file
  never opened on the way. gradio's own Image opens every upload with PIL's full set of decoders (an
  EPS goes to Ghostscript) before a handler sees it, even with type="filepath"; the handler decodes
  with finetune.data.load_rgb, which opens only the accepted formats and applies the pixel limit.
* `answer_label`: a Label whose headline may differ from its top class ("unknown (best guess: roses,
  41%)" over the bars of the classes themselves).

Both replace one method on the instance, not in a subclass: gradio writes a .pyi file beside the
module of every Component subclass when it is defined, which fails where the package is read-only.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from pathlib import Path
from typing import TypeGuard
from urllib.parse import unquote_to_bytes

import gradio as gr
from gradio.components.label import LabelConfidence, LabelData


def image_upload(**kwargs) -> gr.Image:
    """gr.Image(type="filepath") whose preprocess returns the file's path as uploaded, undecoded."""
    image = gr.Image(type="filepath", image_mode=None, **kwargs)
    # the instance's own preprocess, not a subclass: gradio's front end knows gr.Image by its class
    image.preprocess = lambda payload: uploaded_path(image, payload)  # type: ignore[method-assign]
    return image


def uploaded_path(image: gr.Image, payload) -> str | None:
    if payload is None:
        return None
    url = getattr(payload, "url", None) or ""
    if url.startswith("data:"):  # an API client's base64 image: stored as bytes, not decoded
        header, _, data = url.partition(",")
        try:
            raw = base64.b64decode(data, validate=False) if ";base64" in header else unquote_to_bytes(data)
        except (binascii.Error, ValueError):
            raise gr.Error("The pasted image could not be read (bad base64 data).", print_exception=False) from None
        folder = Path(image.GRADIO_CACHE) / "pasted"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{uuid.uuid4().hex}.img"
        path.write_bytes(raw)
        return str(path)
    if payload.path is None:
        raise gr.Error("No image was received.", print_exception=False)
    return str(payload.path)


def answer_label(**kwargs) -> gr.Label:
    """gr.Label that also takes {"label": headline, "confidences": [(class, probability), ...]}."""
    label = gr.Label(**kwargs)
    stock = label.postprocess
    # the instance's own postprocess, not a subclass: gradio's front end knows gr.Label by its class
    label.postprocess = (  # type: ignore[method-assign]
        lambda value: answer_data(value) if is_answer(value) else stock(value)
    )
    return label


def is_answer(value: object) -> TypeGuard[dict]:
    return isinstance(value, dict) and set(value) == {"label", "confidences"}


def answer_data(value: dict) -> LabelData:
    return LabelData(
        label=value["label"],
        confidences=[LabelConfidence(label=name, confidence=float(p)) for name, p in value["confidences"]],
    )
