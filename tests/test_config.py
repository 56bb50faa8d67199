"""Pipeline configuration: YAML 1:1, unknown keys, overrides, frozen, validation."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from diffim_dag.config import (
    KernelConfig,
    PipelineConfig,
    SubtractConfig,
    apply_overrides,
    config_to_dict,
    load_config,
)
from diffim_dag.errors import ConfigError


def _one_line(exc):
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_defaults_and_yaml_round_trip(tmp_path):
    default = PipelineConfig()
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(default)))
    assert load_config(path) == default
    assert load_config() == default
    assert hash(load_config(path)) == hash(default)


def test_yaml_maps_one_to_one(tmp_path):
    text = """
description: a run
method: zogy
sources: {min_snr: 20, bad_mask_planes: [NO_DATA, SAT]}
kernel:
  spatial_kernel_order: 2
  gaussian_degrees: [6, 4, 2]
  width_multipliers: [0.5, 1, 2]
subtract: {mode: convolveScience, tile_size: 512, scale_variance: false}
decorrelation: {enabled: false}
cluster: {n_workers: 4, scheduler: null}
"""
    path = tmp_path / "p.yaml"
    path.write_text(text)
    c = load_config(path)
    assert c.method == "zogy"
    assert c.sources.min_snr == 20.0 and isinstance(c.sources.min_snr, float)
    assert c.sources.bad_mask_planes == ("NO_DATA", "SAT")
    assert c.kernel.spatial_kernel_order == 2 and c.kernel.gaussian_degrees == (6, 4, 2)
    assert c.kernel.width_multipliers == (0.5, 1.0, 2.0)
    assert c.subtract == SubtractConfig(mode="convolveScience", tile_size=512, scale_variance=False)
    assert c.decorrelation.enabled is False and c.cluster.n_workers == 4 and c.cluster.scheduler is None
    # and back: the dict of a loaded config loads to the same config
    path2 = tmp_path / "q.yaml"
    path2.write_text(yaml.safe_dump(config_to_dict(c)))
    assert load_config(path2) == c


@pytest.mark.parametrize(
    "data,name,hint",
    [
        ({"kernel": {"spatial_kernel_ordr": 2}}, "kernel.spatial_kernel_ordr", "kernel.spatial_kernel_order"),
        ({"methd": "al"}, "methd", "method"),
        ({"subtract": {"tile_sise": 5}}, "subtract.tile_sise", "subtract.tile_size"),
    ],
)
def test_unknown_key_names_it_and_nearest(tmp_path, data, name, hint):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = _one_line(exc)
    assert f"'{name}'" in msg and f"'{hint}'" in msg


def test_overrides_parse_types():
    c = load_config(overrides=[
        "kernel.spatial_kernel_order=3", "kernel.fit_background=false", "sources.min_snr=7.5",
        "subtract.template_mask_planes_kept=NO_DATA,BAD", "cluster.scheduler=tcp://10.0.0.1:8786",
        "cluster.n_workers=null", "kernel.width_multipliers=[1, 3]", "kernel.gaussian_degrees=[4, 2]",
    ])
    assert c.kernel.spatial_kernel_order == 3 and type(c.kernel.spatial_kernel_order) is int
    assert c.kernel.fit_background is False
    assert c.sources.min_snr == 7.5
    assert c.subtract.template_mask_planes_kept == ("NO_DATA", "BAD")
    assert c.cluster.scheduler == "tcp://10.0.0.1:8786" and c.cluster.n_workers is None
    assert c.kernel.width_multipliers == (1.0, 3.0)
    for written in ("(1, 3)", "1,3", "[1, 3]"):  # a Python tuple, a bare pair, a YAML list
        c = load_config(overrides=[f"kernel.width_multipliers={written}", "kernel.gaussian_degrees=4,2"])
        assert c.kernel.width_multipliers == (1.0, 3.0)
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=["kernel.spatial_kernel_order"])
    assert "key=value" in _one_line(exc)
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=["kernel.spatial_kernel_order=two"])
    assert "kernel.spatial_kernel_order" in _one_line(exc)
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}


def test_frozen_and_keyword_only():
    c = PipelineConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.method = "zogy"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.kernel.cell_size = 64  # type: ignore[misc]
    with pytest.raises(TypeError):
        KernelConfig(1)  # type: ignore[misc]


@pytest.mark.parametrize(
    "override,field",
    [
        ("kernel.spatial_kernel_order=9", "spatial_kernel_order"),
        ("kernel.min_kernel_size=20", "min_kernel_size"),
        ("subtract.mode=sideways", "mode"),
        ("method=hotpants", "method"),
        ("sources.bad_mask_planes=[BADD]", "bad_mask_planes"),
        ("subtract.template_mask_planes_kept=[NO_DAT]", "template_mask_planes_kept"),
        ("detection.threshold=-1", "threshold"),
        ("subtract.min_template_coverage=1.5", "min_template_coverage"),
        ("cluster.threads_per_worker=0", "threads_per_worker"),
    ],
)
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=[override])
    msg = _one_line(exc)
    assert field in msg


def test_unknown_mask_plane_in_config_suggests():
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=["sources.bad_mask_planes=[BADD, SAT]"])
    msg = _one_line(exc)
    assert "'BADD'" in msg and "did you mean 'BAD'" in msg


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("kernel: [1, 2\n")
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "bad.yaml")
    assert "bad.yaml" in _one_line(exc)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
