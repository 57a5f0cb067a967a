"""torch.hub entry points: one per registered model of nonlocalnet.

``torch.hub.list("OWNER/nonlocalnet")`` shows them for a GitHub repository; for a local folder torch (up to 2.15)
has no ``source="local"`` in ``torch.hub.list``, only in ``torch.hub.load``: list the same names with
``nonlocalnet models`` (or ``nonlocalnet.models.list_models()``).

    model = torch.hub.load("path/to/nonlocalnet", "nl_i3d_r50", source="local", num_classes=400)
    model = torch.hub.load("path/to/nonlocalnet", "nl_i3d_r50", source="local",
                           pretrained="nl_i3d_r50.safetensors")

No weights are downloaded. ``pretrained`` is a local weights file, read by ``nonlocalnet.models.load_model`` (the
options it records are used, so a converted zoo checkpoint computes what it computed there): convert an official
Caffe2, PyTorchVideo or mmaction2 checkpoint with ``nonlocalnet convert SRC out.safetensors``, or inflate ImageNet
weights with ``nonlocalnet.models.inflate_2d_weights`` and save them with ``nonlocalnet.models.save_weights``.
"""

from __future__ import annotations

import os as _os
from collections.abc import Callable as _Callable
from typing import Any as _Any

dependencies = ["torch", "safetensors"]

from nonlocalnet.models import create_model as _create_model  # noqa: E402
from nonlocalnet.models import get_model_entry as _get_model_entry  # noqa: E402
from nonlocalnet.models import list_aliases as _list_aliases  # noqa: E402
from nonlocalnet.models import list_models as _list_models  # noqa: E402
from nonlocalnet.models import load_model as _load_model  # noqa: E402

_NO_DOWNLOAD = (
    "nonlocalnet hosts no weights, so pretrained=True has nothing to download. Pass pretrained='path/to/file."
    "safetensors' instead: convert an official Caffe2, PyTorchVideo or mmaction2 checkpoint with "
    "`nonlocalnet convert SRC out.safetensors`, or inflate ImageNet ResNet weights "
    "with nonlocalnet.models.inflate_2d_weights and save them with nonlocalnet.models.save_weights."
)


def _entry_point(name: str) -> _Callable[..., _Any]:
    def entry(pretrained: bool | str | _os.PathLike = False, **overrides: _Any):
        if pretrained is True:
            raise RuntimeError(_NO_DOWNLOAD.format(name=name))
        if pretrained:  # the file's recorded options, the overrides on top
            return _load_model(pretrained, name, **overrides).train()  # as a fresh model: train mode
        return _create_model(name, **overrides)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (
        f"{_get_model_entry(name).summary}.\n\n"
        "Args:\n"
        "    pretrained: False, or a local file of this model's weights (True is an error: nothing\n"
        "        is downloaded).\n"
        "    **overrides: model options, e.g. num_classes=157.\n"
    )
    return entry


for _name in [*_list_models(), *_list_aliases()]:  # aliases too: the configs' names (nl_i3d_r50_32x2)
    globals()[_name] = _entry_point(_name)
