"""Weights in and out of the models: nonlocalnet's safetensors files, the starting weights a recipe loads, 2D -> 3D
inflation, and the other zoos' checkpoints converted, one module per source.

| module | holds |
|---|---|
| :mod:`.weights` | safetensors save / load with checksum and metadata, :func:`load_model`, the finite-float checks |
| :mod:`.pretrained` | :func:`load_pretrained`: the starting weights of a recipe, from any file that fits |
| :mod:`.inflate` | :func:`inflate_2d_weights`: an ImageNet 2D ResNet into a C2D / I3D network |
| :mod:`.formats` | :func:`detect_format` and :func:`convert_checkpoint`: which zoo a file is from, dispatched |
| :mod:`.mapping` | what the conversions share: :class:`ConversionError`, tensors mapped by name, shapes read |
| :mod:`.caffe2` | the official Caffe2 pickles |
| :mod:`.pytorchvideo` | PyTorchVideo's hub ResNets |
| :mod:`.mmaction2` | mmaction2's ResNet3d recognisers and mmcv's non-local block layout |

Everything public is exported by :mod:`nonlocalnet.models`; this package sits inside ``models`` so that
``create_model(name, pretrained=...)`` loads weights without an import running up the layers.
"""
