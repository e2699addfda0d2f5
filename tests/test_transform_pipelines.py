"""Diffeo and DiffeoPair in training pipelines: every part of a sample moved by its one
field, mixed laws in one batch equal to single calls, replay, p, numpy and PIL in and out,
pickling, DataLoader workers (spawn), and bad samples refused naming the part."""

import pickle
import warnings

import numpy as np
import pytest
import torch

import diffeo_engine as de
from diffeo_engine.transforms.laws import DiffeoParams

pytestmark = pytest.mark.filterwarnings("ignore:.*the fused CPU kernel needs numba:RuntimeWarning")

H, W = 24, 20


def _sample(generator, B=None):
    lead = () if B is None else (B,)
    image = torch.rand(*lead, 3, H, W, generator=generator)
    mask = torch.randint(0, 300, (*lead, H, W), generator=generator)
    return image, mask


def _published(**kwargs):
    return de.Diffeo(sT=1.0, rT=1.0, scut=2.0, rcut=1.0, cutmin=2, cutmax=7, **kwargs)


def test_every_part_moves_with_the_field_of_its_sample(generator):
    image, mask = _sample(generator)
    boxes = torch.tensor([[2.0, 3.0, 15.0, 20.0], [5.5, 1.0, 9.0, 8.0]])
    points = torch.tensor([[4.0, 5.0], [12.5, 18.0], [10.0, 10.0]])
    aug = _published(seed=3)
    out, params = aug(image, mask=mask, boxes=boxes, keypoints=points, ids=17, return_params=True)
    assert aug.last_params is params and params.ids.tolist() == [17]
    field = de.sample_displacement(1, params.cut, params.T, (H, W), seed=3, ids=params.ids)
    assert field.abs().max() > 0.5
    moved_image, moved_mask, moved_boxes, moved_points = out
    torch.testing.assert_close(moved_image, de.warp(image[None], field)[0], rtol=0, atol=2e-5)
    nearest = de.warp(mask[None, None].float(), field, interp="nearest")[0, 0]
    assert moved_mask.dtype == torch.int64 and torch.equal(moved_mask, nearest.long())
    assert torch.equal(moved_boxes, de.move_boxes(boxes[None], field)[0])
    assert torch.equal(moved_points, de.move_keypoints(points[None], field)[0])


def test_mixed_laws_in_one_batch_equal_single_calls(generator):
    images, masks = _sample(generator, B=6)
    boxes = [torch.tensor([[1.0, 2.0, 10.0, 12.0]]) * (k + 1) / 3 for k in range(6)]
    points = torch.rand(6, 4, 2, generator=generator) * 18
    ids = [9, 2, 40, 3, 8, 1]
    aug = de.Diffeo((0.0005, 0.004), (2, 8), seed=21, p=0.8)
    batch = aug(image=images, mask=masks, boxes=boxes, keypoints=points, ids=ids)
    params = aug.last_params
    assert len(set(params.cut.tolist())) > 2  # several cuts in one launch
    for k, i in enumerate(ids):
        one = aug(image=images[k], mask=masks[k], boxes=boxes[k], keypoints=points[k], ids=i)
        assert torch.equal(one["image"], batch["image"][k])
        assert torch.equal(one["mask"], batch["mask"][k])
        assert torch.equal(one["boxes"], batch["boxes"][k])
        assert torch.equal(one["keypoints"], batch["keypoints"][k])


def test_recorded_params_replay_the_same_fields(generator):
    images, masks = _sample(generator, B=3)
    aug = _published(seed=None)  # a fresh seed per call: the record keeps it
    moved = aug(images)
    params = aug.last_params
    again = aug(images, params=params)
    assert torch.equal(again, moved)
    later_masks = aug(mask=masks, params=params)["mask"]
    together = aug(images, mask=masks, params=params)
    assert torch.equal(later_masks, together[1])
    from_log = DiffeoParams.from_dict(params.as_dict())
    assert torch.equal(aug(images, params=from_log), moved)
    assert not torch.equal(aug(images), moved)  # a new call draws anew


def test_samples_left_alone_by_p_come_back_unchanged(generator):
    images, masks = _sample(generator, B=8)
    boxes = torch.tensor([[[0.0, 0.0, 20.0, 24.0], [3.3, 4.4, 7.7, 9.9]]]).expand(8, 2, 4)
    points = torch.rand(8, 3, 2, generator=generator) * 19
    aug = de.Diffeo(0.003, 4, p=0.5, seed=2)
    out = aug(image=images, mask=masks, boxes=boxes, keypoints=points, ids=torch.arange(8))
    applied = aug.last_params.applied
    assert 0 < int(applied.sum()) < 8
    kept = ~applied
    assert torch.equal(out["image"][kept], images[kept])
    assert torch.equal(out["mask"][kept], masks[kept])
    assert torch.equal(out["boxes"][kept], boxes[kept])
    assert torch.equal(out["keypoints"][kept], points[kept])
    assert not torch.equal(out["mask"][applied], masks[applied])


def test_one_image_in_any_form_comes_back_in_that_form(generator):
    from PIL import Image

    aug = de.Diffeo(0.004, 3, seed=6)
    gray = torch.rand(H, W, generator=generator)
    assert aug(gray, ids=0).shape == (H, W)
    pixels = torch.randint(0, 256, (H, W, 3), generator=generator, dtype=torch.uint8)
    expected = de.deform(
        pixels.permute(2, 0, 1)[None], 0.004, 3, seed=6, ids=[0], out_dtype=torch.uint8
    )[0].permute(1, 2, 0)
    array = aug(pixels.numpy(), ids=0)
    assert isinstance(array, np.ndarray) and array.dtype == np.uint8 and array.shape == (H, W, 3)
    assert np.array_equal(array, expected.numpy())
    picture = aug(Image.fromarray(pixels.numpy()), ids=0)
    assert isinstance(picture, Image.Image) and picture.mode == "RGB"
    assert np.array_equal(np.asarray(picture), expected.numpy())
    labels = torch.randint(0, 4, (H, W), generator=generator, dtype=torch.uint8)
    palette_mask = Image.frombytes("P", (W, H), labels.numpy().tobytes())
    palette_mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    out = aug(image=Image.fromarray(pixels.numpy()), mask=palette_mask, ids=0)
    assert out["mask"].mode == "P" and out["mask"].getpalette() == palette_mask.getpalette()
    field = de.sample_displacement(1, 3, 0.004, (H, W), seed=6, ids=[0])
    want = de.warp(labels[None, None].float(), field, interp="nearest")[0, 0].to(torch.uint8)
    assert np.array_equal(np.asarray(out["mask"]), want.numpy())
    masks = aug(np.zeros((2, H, W, 3)), mask=np.ones((2, H, W), dtype=np.int32), ids=[0, 1])[1]
    assert masks.dtype == np.int32 and masks.shape == (2, H, W)


def test_a_dict_sample_keeps_its_other_keys(generator):
    image, mask = _sample(generator)
    aug = de.Diffeo(0.003, 3, seed=1)
    out = aug({"image": image, "mask": mask, "label": 7, "name": "a.png"}, ids=4)
    assert list(out) == ["image", "mask", "label", "name"]
    assert out["label"] == 7 and out["name"] == "a.png"
    assert torch.equal(out["image"], aug(image, ids=4))


def test_a_video_moves_all_its_frames_with_one_field(generator):
    video = torch.rand(2, 5, 3, H, W, generator=generator)  # two videos of five frames
    aug = de.Diffeo((0.001, 0.004), (2, 6), seed=12)
    moved = aug(video=video, ids=[3, 8])["video"]
    params = aug.last_params
    for b in range(2):
        frames = de.deform(
            video[b], params.T[b], int(params.cut[b]), seed=12, ids=[int(params.ids[b])] * 5
        )
        assert torch.equal(moved[b], frames)
    assert aug(video=video[0], ids=3)["video"].shape == (5, 3, H, W)


def test_diffeo_pair_takes_one_image_and_laws(generator):
    from PIL import Image

    pair = de.DiffeoPair((0.001, 0.004), (2, 6), seed=5)
    images = torch.rand(4, 3, H, W, generator=generator)
    tau, noisy = pair(images, torch.tensor([10, 11, 12, 13]))
    params = pair.last_params
    want = de.perturb(images, params.T, params.cut, seed=5, ids=params.ids)
    assert torch.equal(tau, want[0]) and torch.equal(noisy, want[1])
    one_tau, one_noisy = pair(images[2], 12)
    assert torch.equal(one_tau, tau[2]) and torch.equal(one_noisy, noisy[2])
    gray_tau, _ = pair(images[2, 0], 12)
    assert gray_tau.shape == (H, W)
    pixels = (images[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy()
    pictures = pair(Image.fromarray(pixels))
    assert all(isinstance(p, Image.Image) for p in pictures)
    (tau_x, _), params = pair(pixels, return_params=True)
    assert tau_x.dtype == np.uint8 and params.ids.tolist() == [0]


def test_transforms_pickle_and_say_what_they_draw(generator):
    image, mask = _sample(generator)
    aug = _published(seed=4, p=0.9)
    text = repr(aug)
    for part in ("sT=1.0", "rT=1.0", "scut=2.0", "cutmin=2", "cutmax=7", "p=0.9", "seed=4"):
        assert part in text
    assert "T=(0.001, 0.002)" in repr(de.Diffeo((0.001, 0.002), (2, 3)))
    assert "noise='matched'" in repr(de.DiffeoPair(0.001, 3))
    copy = pickle.loads(pickle.dumps(aug))
    assert torch.equal(copy(image, mask=mask, ids=5)[1], aug(image, mask=mask, ids=5)[1])


class IndexedSegmentation(torch.utils.data.Dataset):
    """A per-sample transform keyed by the data-set index (module level: spawn pickles it)."""

    def __init__(self, images, masks, transform):
        self.images, self.masks, self.transform = images, masks, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(image=self.images[index], mask=self.masks[index], ids=index)


@pytest.mark.slow
def test_dataloader_spawn_workers_give_the_batched_call(generator):
    images, masks = _sample(generator, B=6)
    aug = _published(seed=13, p=0.8)
    loader = torch.utils.data.DataLoader(
        IndexedSegmentation(images, masks, aug),
        batch_size=2,
        num_workers=2,
        multiprocessing_context="spawn",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = list(loader)
    ids = torch.arange(6)
    want = aug(image=images, mask=masks, ids=ids)
    assert torch.equal(torch.cat([b["image"] for b in got]), want["image"])
    assert torch.equal(torch.cat([b["mask"] for b in got]), want["mask"])


@pytest.mark.gpu
def test_cuda_samples_equal_cpu_samples(generator):
    images, masks = _sample(generator, B=3)
    boxes = torch.tensor([[[2.0, 3.0, 15.0, 20.0]]]).expand(3, 1, 4)
    aug = _published(seed=2)
    cpu = aug(image=images, mask=masks, boxes=boxes, ids=[1, 2, 3])
    cuda = aug(image=images.cuda(), mask=masks.cuda(), boxes=boxes.cuda(), ids=[1, 2, 3])
    assert cuda["image"].is_cuda and cuda["mask"].is_cuda and cuda["boxes"].is_cuda
    torch.testing.assert_close(cuda["image"].cpu(), cpu["image"], rtol=0, atol=1e-4)
    assert (cuda["mask"].cpu() != cpu["mask"]).float().mean() < 0.01  # rounding ties only
    torch.testing.assert_close(cuda["boxes"].cpu(), cpu["boxes"], rtol=0, atol=1e-3)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda a, x, m: a(x, m), TypeError, "expected one sample"),
        (
            lambda a, x, m: a(x, bboxes=torch.zeros(1, 4)),
            ValueError,
            "bboxes: name this part 'boxes'",
        ),
        (lambda a, x, m: a(x, mask=m[:, :5]), ValueError, r"mask: expected the size \(H, W\)"),
        (
            lambda a, x, m: a(x[None], mask=m[None].expand(2, H, W)),
            ValueError,
            "mask: expected 1 samples",
        ),
        (lambda a, x, m: a(x, boxes=torch.zeros(3)), ValueError, r"boxes: expected \(N, 4\)"),
        (lambda a, x, m: a(x, keypoints=torch.zeros(3, 3)), ValueError, "keypoints"),
        (lambda a, x, m: a(boxes=torch.zeros(1, 4)), ValueError, "size: boxes and keypoints alone"),
        (lambda a, x, m: a(x, mask=m, size=(3, 3)), ValueError, "size"),
        (lambda a, x, m: a(x.numpy().tolist()), TypeError, "image: expected a tensor"),
        (lambda a, x, m: a(x[None, None]), ValueError, "image: expected"),
        (lambda a, x, m: a(x, params={"T": 1}), TypeError, "params: expected the DiffeoParams"),
        (lambda a, x, m: a(label=3), TypeError, "expected at least one of the parts"),
        (lambda a, x, m: a(), TypeError, "expected a sample"),
        (lambda a, x, m: a(x, ids=1.5), TypeError, "ids: expected an integer id or a sequence"),
        (lambda a, x, m: a(x, ids=[1, 2]), ValueError, r"ids: expected one id per sample \(1\)"),
    ],
)
def test_bad_samples_are_refused_naming_the_part(generator, call, error, match):
    image, mask = _sample(generator)
    with pytest.raises(error, match=match):
        call(de.Diffeo(0.001, 3, seed=0), image, mask)


def test_replayed_params_must_fit_the_call(generator):
    images, _ = _sample(generator, B=2)
    aug = de.Diffeo(0.001, 3, seed=0)
    aug(images)
    params = aug.last_params
    with pytest.raises(ValueError, match="params: expected a record of 3 samples"):
        aug(torch.cat([images, images[:1]]), params=params)
    with pytest.raises(ValueError, match="ids: the recorded params carry the ids"):
        aug(images, params=params, ids=[0, 1])
