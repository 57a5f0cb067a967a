"""Non-local blocks inside the keypoint head of Keypoint R-CNN.

torchvision's ``KeypointRCNNHeads`` is a stack of 3x3 conv + ReLU pairs (8 convs of 512 channels by default)
run on the 14x14 RoI features of each detected person. The paper puts 4 NL blocks in it, one after every 2 of
its 8 convs (:data:`PAPER_KEYPOINT_HEAD_NONLOCAL`, 0-based conv indices). Each NL block attends over the 14x14
positions of one RoI: a person's keypoints are located with the whole person in view.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads

from ..layers import BLOCK_DEFAULTS, NonLocalBlock
from .nonlocal_resnet import NL_PREFIX

# After convs 2, 4, 6 and 8 (1-based) of the 8-conv head.
PAPER_KEYPOINT_HEAD_NONLOCAL = (1, 3, 5, 7)


def add_nonlocal_to_head(
    head: nn.Sequential,
    after: Sequence[int],
    *,
    mode: str = BLOCK_DEFAULTS["mode"],
    inter_channels: int | None = BLOCK_DEFAULTS["inter_channels"],
    subsample: int | Sequence[int] | None = BLOCK_DEFAULTS["subsample"],
    scale: None | float | str = BLOCK_DEFAULTS["scale"],
    norm: str | None = None,
    impl: str = BLOCK_DEFAULTS["impl"],
    init: str = BLOCK_DEFAULTS["init"],
) -> nn.Sequential:
    """A copy of a conv head (``nn.Sequential`` of Conv2d, activations) with 2D NL blocks after some convs.

    The head's modules keep their names, so its state dict still loads; each NL block, named ``nl<i>``, comes
    after conv ``i`` (0-based, counted among the head's convs) and its activation.

    Args:
        head: e.g. torchvision's ``KeypointRCNNHeads``.
        after: indices of the convs to follow with an NL block.
        mode, inter_channels, subsample, scale, norm, impl, init: the NL block's options (see
            :func:`nonlocalnet.add_nonlocal`); norm None (W_z = 0 at init) by
            default, as the head has no norm of its own.

    Returns:
        a new ``nn.Sequential`` sharing the head's conv modules.
    """
    named = list(head.named_children())
    convs = [i for i, (_, m) in enumerate(named) if isinstance(m, nn.Conv2d)]
    bad = [i for i in after if not isinstance(i, int) or not 0 <= i < len(convs)]
    if bad:
        raise ValueError(f"head NL indices {bad} are outside the head's {len(convs)} convs (0..{len(convs) - 1})")
    if len(set(after)) != len(after):
        raise ValueError(f"repeated head NL indices {list(after)}")
    # an NL block goes after the conv's activation: right before the next conv (or at the end)
    insert_before = {}
    for index in after:
        next_conv = convs[index + 1] if index + 1 < len(convs) else len(named)
        insert_before.setdefault(next_conv, []).append(index)
    children: OrderedDict[str, nn.Module] = OrderedDict()
    for position in range(len(named) + 1):
        for index in insert_before.get(position, []):
            conv = named[convs[index]][1]
            children[f"{NL_PREFIX}{index}"] = NonLocalBlock(
                conv.out_channels,
                dim=2,
                mode=mode,
                inter_channels=inter_channels,
                subsample=subsample,
                scale=scale,
                norm=norm,
                impl=impl,
                init=init,
            ).to(conv.weight.device)
        if position < len(named):
            name, module = named[position]
            children[name] = module
    return nn.Sequential(children)


def keypoint_head(
    in_channels: int,
    *,
    channels: int = 512,
    num_convs: int = 8,
    nonlocal_after: Sequence[int] = (),
    mode: str = BLOCK_DEFAULTS["mode"],
    inter_channels: int | None = BLOCK_DEFAULTS["inter_channels"],
    scale: None | float | str = BLOCK_DEFAULTS["scale"],
    norm: str | None = None,
    impl: str = BLOCK_DEFAULTS["impl"],
    init: str = BLOCK_DEFAULTS["init"],
) -> nn.Sequential:
    """torchvision's keypoint head (``num_convs`` 3x3 convs of ``channels``) with NL blocks after some convs.

    Args:
        in_channels: channels of the RoI features (the FPN's).
        channels: width of every conv (512 in the paper and torchvision).
        num_convs: number of convs (8 in the paper and torchvision).
        nonlocal_after: 0-based conv indices to follow with an NL block; the paper's is
            :data:`PAPER_KEYPOINT_HEAD_NONLOCAL`.
        mode, inter_channels, scale, norm, impl, init: the NL block's options.
    """
    head = KeypointRCNNHeads(in_channels, [channels] * num_convs)
    if not nonlocal_after:
        return head
    return add_nonlocal_to_head(
        head, nonlocal_after, mode=mode, inter_channels=inter_channels, scale=scale, norm=norm, impl=impl, init=init
    )
