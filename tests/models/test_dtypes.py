import typing

import torch

from mgmlora.models.dtypes import DTYPES, DtypeName


def test_every_accepted_name_maps_to_the_torch_dtype_of_that_name():
    assert set(DTYPES) == set(typing.get_args(DtypeName))
    for name, dtype in DTYPES.items():
        assert dtype is getattr(torch, name) and dtype.is_floating_point


def test_settings_name_dtypes_with_the_one_literal():
    from mgmlora.models.args import ModelArgs
    from mgmlora.models.quantization import QuantizationArgs
    from mgmlora.tools.export import model_args_for

    hints = [typing.get_type_hints(ModelArgs)["dtype"], typing.get_type_hints(QuantizationArgs)["compute_dtype"],
             typing.get_type_hints(model_args_for)["dtype"]]
    assert hints[0] == DtypeName and typing.get_args(hints[1]) == typing.get_args(hints[2]) == (DtypeName, type(None))
