"""benchmarks/unet_profile.py on the tiny preset: every FLOP lands in a group, attention's matmuls are
counted as attention, and the printed table has a row per group."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def profile(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import unet_profile

    return unet_profile


def test_operators_fall_into_their_groups(profile):
    assert profile.group_of("aten::_scaled_dot_product_flash_attention_for_cpu").startswith("attention")
    assert profile.group_of("aten.bmm.default").startswith("attention")
    assert profile.group_of("mkldnn::_convolution_pointwise") == "convolution"
    assert profile.group_of("aten.convolution.default") == "convolution"
    assert profile.group_of("mkldnn::_linear_pointwise").startswith("linear")
    assert profile.group_of("aten.addmm.default").startswith("linear")
    assert profile.group_of("aten::native_group_norm") == profile.OTHER


def test_the_flops_of_a_call_are_split_without_loss(profile):
    from cpu import unet_gflop

    groups = profile.flops_by_group("tiny", 64)
    assert sum(groups.values()) / 1e9 == pytest.approx(unet_gflop("tiny", 64))
    assert all(groups[g] > 0 for g in profile.GROUPS)  # the tiny U-Net has attention, convs and linears


def test_the_table_has_a_row_per_group(profile, capsys):
    profile.main(["--preset", "tiny", "--size", "64", "--repeats", "1", "--precision", "fp32"])
    out = capsys.readouterr().out
    assert "of a square matmul in the same dtype" in out
    for group in [*profile.GROUPS, profile.OTHER]:
        assert f"| {group} |" in out
