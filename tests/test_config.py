"""QuantizeConfig: validation of every field, and the quantize_config.json dict round trip (gptq-reference.md 1.7)."""

from __future__ import annotations

import json
import math

import pytest

from gptq_jax.config import QuantizeConfig

AUTOGPTQ_KEYS = {
    "bits", "group_size", "damp_percent", "desc_act", "static_groups", "sym", "true_sequential",
    "model_name_or_path", "model_file_base_name", "quant_method", "checkpoint_format",
}
GPTQMODEL_KEYS = {"lm_head", "pack_dtype", "meta"}


def test_defaults_are_the_reference_values():
    c = QuantizeConfig()
    assert (c.bits, c.group_size, c.sym, c.damp_percent, c.block_size, c.mse, c.checkpoint_format) == (
        4, 128, True, 0.01, 128, 0.0, "gptq")
    assert c.maxq == 15
    assert c.num_groups(4096) == 32 and c.num_groups(11008) == 86  # section 1.1 example
    assert c.num_groups(172) == 2  # tail group: ceil(172 / 128)
    assert QuantizeConfig(group_size=-1).num_groups(4096) == 1
    assert QuantizeConfig(group_size=-1).effective_group_size(4096) == 4096


def test_frozen():
    c = QuantizeConfig()
    with pytest.raises(Exception):
        c.bits = 3  # type: ignore[misc]
    assert c.replace(bits=3).bits == 3 and c.bits == 4


def test_mse_bool_means_reference_norm():
    assert QuantizeConfig(mse=True).mse == 2.4
    assert QuantizeConfig(mse=False).mse == 0.0
    assert QuantizeConfig(mse=3.0).mse == 3.0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"bits": 5}, "bits"),
        ({"bits": 1}, "bits"),
        ({"bits": 16}, "bits"),
        ({"bits": "4"}, "bits"),
        ({"bits": True}, "bits"),
        ({"bits": 4.0}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": -2}, "group_size"),
        ({"group_size": 64.0}, "group_size"),
        ({"group_size": None}, "group_size"),
        ({"sym": 1}, "sym"),
        ({"sym": "true"}, "sym"),
        ({"desc_act": None}, "desc_act"),
        ({"static_groups": 0}, "static_groups"),
        ({"true_sequential": "yes"}, "true_sequential"),
        ({"lm_head": 1}, "lm_head"),
        ({"damp_percent": 0.0}, "damp_percent"),
        ({"damp_percent": 1.0}, "damp_percent"),
        ({"damp_percent": -0.01}, "damp_percent"),
        ({"damp_percent": "0.01"}, "damp_percent"),
        ({"damp_percent": math.nan}, "damp_percent"),
        ({"damp_auto_increment": -0.001}, "damp_auto_increment"),
        ({"damp_auto_increment": 1.0}, "damp_auto_increment"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": 128.0}, "block_size"),
        ({"mse": -1.0}, "mse"),
        ({"mse": math.inf}, "mse"),
        ({"mse": "yes"}, "mse"),
        ({"mse_grid": 0}, "mse_grid"),
        ({"mse_maxshrink": 0.0}, "mse_maxshrink"),
        ({"mse_maxshrink": 1.5}, "mse_maxshrink"),
        ({"checkpoint_format": "marlin"}, "checkpoint_format"),
        ({"checkpoint_format": "awq"}, "checkpoint_format"),
        ({"checkpoint_format": "GPTQ"}, "checkpoint_format"),
    ],
)
def test_invalid_values_raise_a_clear_error(kwargs, field):
    with pytest.raises(ValueError, match=rf"QuantizeConfig\.{field}="):
        QuantizeConfig(**kwargs)


def test_marlin_error_says_why():
    with pytest.raises(ValueError, match="Marlin"):
        QuantizeConfig(checkpoint_format="marlin")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128, 100])
@pytest.mark.parametrize("flags", [(True, False, False), (False, True, False), (True, True, True),
                                   (False, False, True)])
def test_every_valid_combination_round_trips(bits, group_size, flags):
    sym, desc_act, static_groups = flags
    c = QuantizeConfig(bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, static_groups=static_groups,
                       checkpoint_format="gptq" if sym else "gptq_v2", damp_auto_increment=0.01, mse=2.4,
                       lm_head=desc_act)
    d = c.to_dict()
    d = json.loads(json.dumps(d))  # what a file holds
    assert QuantizeConfig.from_dict(d) == c


def test_to_dict_writes_autogptq_and_gptqmodel_keys():
    d = QuantizeConfig(bits=3, group_size=64, desc_act=True).to_dict(model_name_or_path="/x/y")
    assert AUTOGPTQ_KEYS | GPTQMODEL_KEYS <= set(d)
    assert d["quant_method"] == "gptq" and d["pack_dtype"] == "int32"
    assert (d["bits"], d["group_size"], d["desc_act"], d["sym"], d["damp_percent"]) == (3, 64, True, True, 0.01)
    assert d["model_name_or_path"] == "/x/y" and d["model_file_base_name"] == "model"
    assert d["meta"]["damp_auto_increment"] == 0.0025 and d["meta"]["mse"] == 0.0
    assert d["meta"]["quantizer"][0].startswith("gptq_jax")
    json.dumps(d)  # serialisable


def test_from_dict_thebloke_autogptq_file():
    # The shape of a TheBloke-era AutoGPTQ quantize_config.json (section 1.7).
    d = {"bits": 4, "group_size": 128, "damp_percent": 0.1, "desc_act": True, "static_groups": False,
         "sym": True, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model",
         "quant_method": "gptq"}
    c = QuantizeConfig.from_dict(d)
    assert (c.bits, c.group_size, c.damp_percent, c.desc_act, c.sym, c.checkpoint_format) == (
        4, 128, 0.1, True, True, "gptq")


def test_from_dict_gptqmodel_file_reads_meta():
    d = {"bits": 8, "group_size": 32, "desc_act": False, "sym": False, "lm_head": True, "quant_method": "gptq",
         "checkpoint_format": "gptq_v2", "pack_dtype": "int32",
         "meta": {"quantizer": ["gptqmodel:4.1.0"], "damp_percent": 0.05, "damp_auto_increment": 0.01,
                  "static_groups": True, "true_sequential": False, "mse": 0.0, "v2": False}}
    c = QuantizeConfig.from_dict(d)
    assert (c.bits, c.group_size, c.sym, c.lm_head, c.checkpoint_format) == (8, 32, False, True, "gptq_v2")
    assert (c.damp_percent, c.damp_auto_increment, c.static_groups, c.true_sequential) == (0.05, 0.01, True, False)


def test_from_dict_synonyms_and_unknown_keys():
    c = QuantizeConfig.from_dict({"w_bit": 3, "q_group_size": 64, "sym": False, "format": "gptq_v2",
                                  "zero_point": True, "version": "GEMM", "something_new": [1, 2]})
    assert (c.bits, c.group_size, c.sym, c.checkpoint_format) == (3, 64, False, "gptq_v2")


def test_from_dict_missing_sym_defaults_true_with_a_warning():
    with pytest.warns(UserWarning, match="sym"):
        c = QuantizeConfig.from_dict({"bits": 4, "group_size": 128})
    assert c.sym is True


def test_from_dict_mse_true_and_int_damp():
    c = QuantizeConfig.from_dict({"bits": 4, "sym": True, "mse": True, "damp_percent": 0.5})
    assert c.mse == 2.4


@pytest.mark.parametrize(
    "d, match",
    [
        ({"bits": 4, "sym": True, "quant_method": "awq"}, "quant_method"),
        ({"bits": 4, "sym": True, "is_marlin_format": True}, "is_marlin_format"),
        ({"bits": 4, "sym": True, "checkpoint_format": "marlin"}, "checkpoint_format"),
        ({"bits": 4, "sym": True, "pack_dtype": "int16"}, "pack_dtype"),
        ({"bits": 4, "sym": True, "dynamic": {"-:.*down.*": {}}}, "dynamic"),
        ({"group_size": 128, "sym": True}, "bits"),
        ({"bits": 6, "sym": True}, "bits"),
        ({"bits": 4, "sym": True, "group_size": 0}, "group_size"),
        ({"bits": 4, "sym": True, "damp_percent": 2}, "damp_percent"),
        ({"bits": 4, "sym": "no"}, "sym"),
        ({"bits": 4, "sym": True, "meta": [1]}, "meta"),
    ],
)
def test_from_dict_rejects_bad_files_naming_the_source(d, match):
    with pytest.raises(ValueError, match=match) as e:
        QuantizeConfig.from_dict(d, source="some/dir/quantize_config.json")
    assert "some/dir/quantize_config.json" in str(e.value)


def test_from_dict_needs_a_dict():
    with pytest.raises(TypeError, match="quantize_config"):
        QuantizeConfig.from_dict([("bits", 4)])  # type: ignore[arg-type]


def test_from_dict_reads_act_group_aware():
    cfg = QuantizeConfig.from_dict({"bits": 4, "group_size": 128, "sym": True, "meta": {"act_group_aware": True}})
    assert cfg.act_group_aware and not cfg.desc_act
    # per-channel or act-order configs drop it, as GPTQModel resolves them
    assert not QuantizeConfig.from_dict({"bits": 4, "group_size": -1, "sym": True, "act_group_aware": True}
                                        ).act_group_aware
