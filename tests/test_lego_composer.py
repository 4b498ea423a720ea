"""The LEGO composer, Studio.merge and `studio merge`."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import random_lora
from studio.adapters.formats import read_adapter, write_adapter
from studio.cli import main

FAST = dict(steps=3, seed=5, progress=False)


def test_lego_with_one_adapter_equals_merge(sd1):
    sd1.adapters.add(random_lora(sd1, "a", rank=4, seed=1))
    merged = sd1.run("a red circle", [("a", 0.8)], method="lego", method_params={"reweight": False}, **FAST)
    plain = sd1.run("a red circle", [("a", 0.8)], method="merge", **FAST)
    assert np.abs(np.asarray(merged.images[0], float) - np.asarray(plain.images[0], float)).max() <= 2
    assert merged.report["merged_rank"] == 4


def test_lego_merge_is_cached_across_calls(sd1):
    sd1.adapters.add(random_lora(sd1, "a", seed=1))
    sd1.adapters.add(random_lora(sd1, "b", seed=2))
    first = sd1.run("a red circle", ["a", "b"], method="lego", **FAST)
    second = sd1.run("a red circle", ["a", "b"], method="lego", **FAST)
    assert first.report["cache_hits"] == 0 and second.report["cache_hits"] == 1
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))
    assert not any(m._forward_hooks for m in sd1.pipe.unet.modules())


def test_studio_merge_adds_a_library_adapter(sd1):
    sd1.adapters.add(random_lora(sd1, "a", seed=1))
    sd1.adapters.add(random_lora(sd1, "b", seed=2))
    merged = sd1.merge(["a", "b"], method="cat", name="ab")
    assert "ab" in sd1.adapters and merged.ranks() == [8]
    assert sd1.generate("a red circle", ["ab"], **FAST)[0].size == (64, 64)


def test_cli_merge_writes_a_loadable_file(sd1, tmp_path):
    paths = []
    for i in range(2):
        paths.append(write_adapter(random_lora(sd1, f"s{i}", seed=i), tmp_path / f"s{i}.safetensors", format="kohya"))
    out = tmp_path / "m.safetensors"
    assert main(["merge", "--method", "svd", "--rank", "4", "--weights", "1,0.5", *map(str, paths), "--out", str(out)]) == 0
    merged = read_adapter(out)
    assert merged.ranks() == [4] and merged.metadata["merge_method"] == "svd"


@pytest.mark.parametrize("args, message", [
    (["--weights", "1"], "weights"),
    (["--method", "cat", "--rank", "2"], "cat"),
    (["--method", "nope"], "valid methods"),
])
def test_cli_merge_bad_input_exits_2(sd1, tmp_path, capsys, args, message):
    paths = [write_adapter(random_lora(sd1, f"s{i}", seed=i), tmp_path / f"s{i}.safetensors") for i in range(2)]
    out = tmp_path / "m.safetensors"
    assert main(["merge", *args, *map(str, paths), "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_lego_composer_passes_magnitude_to_the_merge(sd1):
    from studio.adapters.merge import merge_adapters

    sd1.adapters.add(random_lora(sd1, "a", seed=1))
    sd1.adapters.add(random_lora(sd1, "b", seed=2))
    run = sd1.run("a red circle", ["a", "b"], method="lego", method_params={"magnitude": "sum"}, **FAST)
    direct = merge_adapters([sd1.adapters.get("a"), sd1.adapters.get("b")], [1.0, 1.0], method="lego", magnitude="sum")
    via = sd1.merge(["a", "b"], method="lego", name="ab-sum", magnitude="sum")
    mean = merge_adapters([sd1.adapters.get("a"), sd1.adapters.get("b")], [1.0, 1.0], method="lego")
    name = next(iter(direct.layers))
    assert direct.layers[name].delta().norm() > mean.layers[name].delta().norm()
    assert np.allclose(via.layers[name].delta().numpy(), direct.layers[name].delta().numpy())
    assert run.report["merged_rank"] == max(d.rank for d in direct.layers.values())
    with pytest.raises(Exception, match="magnitude"):
        sd1.run("a red circle", ["a", "b"], method="lego", method_params={"magnitude": "loud"}, **FAST)
