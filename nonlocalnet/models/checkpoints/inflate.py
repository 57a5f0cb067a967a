"""2D -> 3D inflation: ImageNet ResNet weights (torchvision layout) into any C2D / I3D :class:`ResNet3d`.

Each 2D kernel W (O, I, kh, kw) becomes a 3D kernel (O, I, t, kh, kw) whose t temporal slices are all W / t, so a
clip of one repeated frame gives every 3D conv the 2D conv's response (away from the clip's temporal ends, where
zero padding cuts the temporal kernel), and the inflated network the 2D network's features. BN and the fc copy
over unchanged; non-local blocks have no 2D counterpart and keep their initialisation (the identity).

    import torchvision
    state = torchvision.models.resnet50(weights="IMAGENET1K_V1").state_dict()
    model = create_model("nl_i3d_r50")
    report = inflate_2d_weights(model, state)   # fc skipped: 1000 ImageNet classes vs 400
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

_BRANCH = {
    "conv_a": "conv1",
    "bn_a": "bn1",
    "conv_b": "conv2",
    "bn_b": "bn2",
    "conv_c": "conv3",
    "bn_c": "bn3",
    "shortcut.conv": "downsample.0",
    "shortcut.bn": "downsample.1",
}
_BLOCK = re.compile(r"^res([2-5])\.(\d+)\.(.+)\.([a-z_]+)$")
_NONLOCAL = re.compile(r"^res[2-5]\.nl\d+\.")


def torchvision_name(name: str) -> str | None:
    """The torchvision ResNet name of a :class:`ResNet3d` state-dict entry, or None (non-local blocks).

    ``res4.2.conv_a.weight`` -> ``layer3.2.conv1.weight``;
    ``res2.0.shortcut.bn.bias`` -> ``layer1.0.downsample.1.bias``;
    ``head.fc.weight`` -> ``fc.weight``; ``conv1``/``bn1`` keep their names.
    """
    if _NONLOCAL.match(name):
        return None
    if name.startswith(("conv1.", "bn1.")):
        return name
    if name.startswith("head.fc."):
        return name[len("head.") :]
    match = _BLOCK.match(name)
    if match and match.group(3) in _BRANCH:
        stage, block, module, tensor = match.groups()
        return f"layer{int(stage) - 1}.{block}.{_BRANCH[module]}.{tensor}"
    raise KeyError(f"no torchvision counterpart is known for {name!r}")


@dataclass
class InflationReport:
    """What :func:`inflate_2d_weights` did.

    Attributes:
        copied: model entries copied unchanged (BN, fc, convs with a 1-frame kernel).
        inflated: conv weights repeated over t > 1 frames and divided by t.
        kept: model entries left at their initialisation (non-local blocks; the fc if skipped).
        unused: 2D entries not used (the 2D fc if skipped).
    """

    copied: list[str] = field(default_factory=list)
    inflated: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)


def inflate_2d_weights(
    model: nn.Module, state_dict_2d: Mapping[str, Tensor], *, load_classifier: bool | None = None
) -> InflationReport:
    """Loads a torchvision ResNet state dict into a C2D / I3D ResNet3d, inflating conv kernels over time.

    Args:
        model: the 3D model, changed in place (its depth and width must match the 2D network's).
        state_dict_2d: a torchvision ResNet-50/101 (or same-layout) state dict.
        load_classifier: copy the fc; default: only if its shape matches the model's (e.g. not 1000 vs 400).

    Returns:
        An :class:`InflationReport`.

    Raises:
        ValueError: a model entry the 2D state lacks, a 2D entry the model cannot place, or a shape that does not
            match (the message names it).
    """
    target = model.state_dict()
    report = InflationReport()
    fc_2d = {k for k in state_dict_2d if k.startswith("fc.")}
    if load_classifier is None:
        load_classifier = all(
            k in state_dict_2d and tuple(state_dict_2d[k].shape) == tuple(target[f"head.{k}"].shape)
            for k in ("fc.weight", "fc.bias")
            if f"head.{k}" in target
        ) and any(k.startswith("head.fc.") for k in target)
    used: set[str] = set()
    new_state: dict[str, Tensor] = {}
    for name, tensor in target.items():
        source = torchvision_name(name)
        if source is None or (source.startswith("fc.") and not load_classifier):
            report.kept.append(name)
            continue
        if source not in state_dict_2d:
            if source.endswith("num_batches_tracked"):
                report.kept.append(name)
                continue
            raise ValueError(
                f"the 2D state dict has no {source!r} for the model's {name!r} "
                f"(is it a torchvision ResNet of the same depth?)"
            )
        weight = state_dict_2d[source]
        used.add(source)
        if tensor.dim() == 5 and weight.dim() == 4:
            out_c, in_c, t = tensor.shape[:3]
            if tuple(weight.shape) != (out_c, in_c, *tensor.shape[3:]):
                raise ValueError(
                    f"{source} has shape {tuple(weight.shape)}; the model's {name} needs a 2D kernel of "
                    f"shape {(out_c, in_c, *tensor.shape[3:])} to inflate to {tuple(tensor.shape)}"
                )
            # (O, I, kh, kw) -> (O, I, t, kh, kw), each temporal slice W / t
            new_state[name] = weight.unsqueeze(2).repeat(1, 1, t, 1, 1) / t
            (report.inflated if t > 1 else report.copied).append(name)
        else:
            if tuple(weight.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"{source} has shape {tuple(weight.shape)}; the model's {name} has {tuple(tensor.shape)}"
                )
            new_state[name] = weight
            report.copied.append(name)
    report.unused = sorted(set(state_dict_2d) - used)
    unexpected = [k for k in report.unused if not (k in fc_2d and not load_classifier)]
    if unexpected:
        raise ValueError(
            f"{len(unexpected)} entries of the 2D state dict have no place in the model: "
            f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''} (deeper 2D network?)"
        )
    with torch.no_grad():
        for name, value in new_state.items():
            target[name].copy_(value.to(dtype=target[name].dtype))
    return report
