import torch

from birdbone.core.masks import MaskSet


def test_bitmap_save_load_is_exact(tmp_path):
    generator = torch.Generator().manual_seed(0)
    masks = MaskSet(
        {
            "a.weight": torch.rand(7, 13, generator=generator) > 0.5,
            "b.weight": torch.rand(3, 5, generator=generator) > 0.9,
        }
    )
    masks.save(tmp_path / "m.safetensors")
    back = MaskSet.load(tmp_path / "m.safetensors")
    assert back.equals(masks)
    assert (tmp_path / "m.safetensors").stat().st_size < 7 * 13 + 15 + 400  # bits, not bytes


def test_apply_zeroes_exactly_the_removed_weights(tiny_bundle):
    model = tiny_bundle.model
    name = "model.layers.0.mlp.up_proj.weight"
    weight = dict(model.named_parameters())[name]
    before = weight.detach().clone()
    mask = torch.ones_like(before, dtype=torch.bool)
    mask[::2, 1::3] = False
    masks = MaskSet({name: mask})
    masks.apply_(model)
    assert torch.equal(weight[mask], before[mask])
    assert bool((weight[~mask] == 0).all())
    assert masks.sparsity()[name] == 1 - float(mask.float().mean())
    assert MaskSet.from_weights({name: weight}).equals(masks)


def test_masks_are_held_as_bits_and_counted_exactly():
    generator = torch.Generator().manual_seed(1)
    mask = torch.rand(11, 17, generator=generator) > 0.3  # 187 bits: the last byte is padded
    masks = MaskSet({"w": mask})
    assert masks._bits["w"].nbytes == (mask.numel() + 7) // 8
    assert masks.kept("w") == int(mask.sum())
    assert masks.sparsity()["w"] == 1 - int(mask.sum()) / mask.numel()
    assert torch.equal(masks["w"], mask)
    other = MaskSet({"w": mask.clone()})
    other_flipped = mask.clone()
    other_flipped[3, 4] = not bool(other_flipped[3, 4])
    assert masks.equals(other)
    assert not masks.equals(MaskSet({"w": other_flipped}))
