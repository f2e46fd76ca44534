"""Tests for krtfuap._validation (input checks) and krtfuap._batches (batch iteration)."""

from __future__ import annotations

import re
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch.utils.data import DataLoader, TensorDataset

from krtfuap._batches import iter_image_batches
from krtfuap._validation import check_embeddings, check_images, check_perturbation


def _images(batch: int = 2, size: int = 8) -> torch.Tensor:
    return torch.rand(batch, 3, size, size)


# --------------------------------------------------------------------------- check_images


def test_check_images_returns_same_object():
    images = _images()
    assert check_images(images) is images


def test_check_images_accepts_exact_bounds():
    images = torch.zeros(1, 3, 4, 4)
    images[0, 0, 0, 0] = 1.0
    assert check_images(images) is images


def test_non_tensor_is_type_error_with_conversion_hint():
    with pytest.raises(TypeError, match=r"must be a torch\.Tensor.*got ndarray.*torch\.as_tensor"):
        check_images(np.zeros((1, 3, 4, 4), dtype=np.float32))
    with pytest.raises(TypeError, match="got list"):
        check_images([[0.0]])


def test_three_dims_suggests_unsqueeze():
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\), got \(3, 8, 8\).*unsqueeze\(0\)"):
        check_images(torch.rand(3, 8, 8))


@pytest.mark.parametrize("shape", [(8,), (8, 8), (1, 1, 3, 8, 8)])
def test_other_ndim_names_the_shape(shape):
    with pytest.raises(ValueError, match=r"must have shape \(B, 3, H, W\)") as info:
        check_images(torch.rand(*shape))
    assert str(tuple(shape)) in str(info.value)
    assert "unsqueeze" not in str(info.value)


def test_channels_last_suggests_permute():
    with pytest.raises(ValueError, match=r"channels-last.*permute\(0, 3, 1, 2\)"):
        check_images(torch.rand(2, 8, 8, 3))


@pytest.mark.parametrize("channels", [1, 4])
def test_grey_or_rgba_suggests_rgb(channels):
    with pytest.raises(ValueError, match=r"grey or RGBA.*3-channel RGB"):
        check_images(torch.rand(2, channels, 8, 8))


def test_wrong_channel_count_without_known_layout_still_names_shape():
    with pytest.raises(ValueError, match=r"got \(2, 5, 8, 8\)\.$"):
        check_images(torch.rand(2, 5, 8, 8))


def test_empty_batch():
    with pytest.raises(ValueError, match=r"empty batch \(B = 0\)"):
        check_images(torch.rand(0, 3, 8, 8))


def test_uint8_suggests_divide_by_255():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    with pytest.raises(TypeError, match=r"floating point.*torch\.uint8.*images\.float\(\) / 255"):
        check_images(images)


def test_integer_and_bool_dtypes_are_rejected():
    with pytest.raises(TypeError, match="torch.int64"):
        check_images(torch.zeros(1, 3, 4, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.bool"):
        check_images(torch.zeros(1, 3, 4, 4, dtype=torch.bool))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values(bad):
    images = _images()
    images[1, 2, 3, 4] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        check_images(images)


def test_0_255_data_gets_divide_hint():
    images = _images() * 255
    with pytest.raises(ValueError, match=r"must be in \[0, 1\].*0-255 data: divide by 255") as info:
        check_images(images)
    assert "FaceEmbedder" in str(info.value)


def test_slightly_above_one_has_no_255_hint_but_is_rejected():
    images = _images()
    images[0, 0, 0, 0] = 1.5
    with pytest.raises(ValueError, match=r"\[0, 1\]") as info:
        check_images(images)
    assert "1.5" in str(info.value)
    assert "0-255" in str(info.value)  # 1.5 could still be 0-255 data: the hint is given for (1, 255]


def test_far_above_255_has_no_255_hint():
    images = _images()
    images[0, 0, 0, 0] = 1000.0
    with pytest.raises(ValueError, match=r"\[0, 1\]") as info:
        check_images(images)
    assert "0-255" not in str(info.value)


def test_negative_values_rejected_without_255_hint():
    images = _images() * 2 - 1  # e.g. (x - 0.5) / 0.5 normalised input
    with pytest.raises(ValueError, match=r"must be in \[0, 1\], got values in \[-") as info:
        check_images(images)
    assert "0-255" not in str(info.value)


def test_custom_name_in_messages():
    with pytest.raises(ValueError, match="^clean images must have shape"):
        check_images(torch.rand(3, 8, 8), name="clean images")


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(
        st.integers(1, 3), st.just(3), st.integers(1, 6), st.integers(1, 6)
    ),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    data=st.data(),
)
def test_any_valid_float_batch_passes_unchanged(shape, dtype, data):
    array = data.draw(
        hnp.arrays(np.float64, shape, elements=st.floats(0.0, 1.0, allow_nan=False, allow_infinity=False))
    )
    images = torch.from_numpy(array).to(dtype)
    before = images.clone()
    assert check_images(images) is images
    assert torch.equal(images, before)


# --------------------------------------------------------------------------- check_perturbation


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_check_perturbation_returns_a_finite_float_tensor_of_the_size(dtype):
    perturbation = torch.zeros(3, 4, 5, dtype=dtype)
    assert check_perturbation(perturbation, (4, 5), name="v") is perturbation


@pytest.mark.parametrize("value, problem", [
    (np.zeros((3, 4, 5), np.float32), r"^v must be a float tensor of shape \(3, 4, 5\), got ndarray; fix it$"),
    (torch.zeros(3, 4, 5, dtype=torch.int32), r"^v must be a float tensor of shape \(3, 4, 5\), got dtype torch.int32"),
    (torch.zeros(3, 5, 4), r"^v must be a tensor of shape \(3, 4, 5\), the faces' size, got \(3, 5, 4\); fix it$"),
    (torch.zeros(1, 3, 4, 5), r"got \(1, 3, 4, 5\); fix it$"),
    (torch.full((3, 4, 5), float("inf")), r"^v holds NaN or infinite values; fix it$"),
    (torch.zeros(3, 4, 5).index_fill_(1, torch.tensor([2]), float("nan")), r"^v holds NaN or infinite values; fix it$"),
])
def test_check_perturbation_names_the_problem_and_the_fix(value, problem):
    with pytest.raises(ValueError, match=problem):
        check_perturbation(value, (4, 5), name="v", fix="fix it")


def test_check_perturbation_without_a_fix_ends_at_the_problem():
    with pytest.raises(ValueError, match=r"^v holds NaN or infinite values$"):
        check_perturbation(torch.full((3, 4, 5), float("nan")), (4, 5), name="v")


# --------------------------------------------------------------------------- check_embeddings


def test_check_embeddings_returns_same_object():
    embeddings = torch.randn(4, 16)
    assert check_embeddings(embeddings, 4) is embeddings


def test_check_embeddings_non_tensor():
    with pytest.raises(TypeError, match=r"got tuple; wrap the model so that forward returns the embedding"):
        check_embeddings((torch.randn(4, 16),), 4)


@pytest.mark.parametrize(
    "shape, batch", [((4, 16, 1), 4), ((16,), 4), ((3, 16), 4), ((4, 2, 8), 4)]
)
def test_check_embeddings_wrong_shape(shape, batch):
    expected = f"must have shape (B, D) = ({batch}, D), got {tuple(shape)}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        check_embeddings(torch.randn(*shape), batch)


def test_check_embeddings_wrong_shape_mentions_wrapper():
    with pytest.raises(ValueError, match="flatten or select the embedding output"):
        check_embeddings(torch.randn(2, 4, 1, 1), 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_embeddings_non_finite(bad):
    embeddings = torch.randn(3, 8)
    embeddings[2, 5] = bad
    with pytest.raises(ValueError, match="model output contains NaN or inf"):
        check_embeddings(embeddings, 3)


# --------------------------------------------------------------------------- iter_image_batches


def test_tensor_is_split_into_batches():
    images = _images(batch=7)
    batches = list(iter_image_batches(images, batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert torch.equal(torch.cat(batches), images)
    storage = images.untyped_storage().data_ptr()
    assert all(b.untyped_storage().data_ptr() == storage for b in batches)  # views, not copies


def test_bad_tensor_is_checked_before_yielding():
    with pytest.raises(ValueError, match=r"^X must be in \[0, 1\]"):
        list(iter_image_batches(_images() * 255))
    with pytest.raises(ValueError, match=r"^faces is an empty batch"):
        list(iter_image_batches(torch.rand(0, 3, 8, 8), name="faces"))


def test_list_of_tensors():
    batches = [_images(2), _images(3)]
    out = list(iter_image_batches(batches))
    assert len(out) == 2 and out[0] is batches[0] and out[1] is batches[1]


def test_tuple_list_and_dict_items():
    a, b, c = _images(1), _images(2), _images(3)
    loader = [(a, torch.tensor([0])), [b, "labels", 3], {"image": c, "label": 7}]
    out = list(iter_image_batches(loader))
    assert out[0] is a and out[1] is b and out[2] is c


def test_dataloader_items():
    images = _images(5)
    loader = DataLoader(TensorDataset(images, torch.arange(5)), batch_size=2)
    out = list(iter_image_batches(loader))
    assert [len(x) for x in out] == [2, 2, 1]
    assert torch.equal(torch.cat(out), images)
    # Re-iterable: a second pass gives the same data.
    assert torch.equal(torch.cat(list(iter_image_batches(loader))), images)


def test_empty_tuple_item():
    with pytest.raises(ValueError, match="empty tuple"):
        list(iter_image_batches([()]))


def test_dict_without_image_key_lists_keys():
    with pytest.raises(ValueError, match=r"without an 'image' key \(keys: \['img', 'label'\]\)"):
        list(iter_image_batches([{"label": 1, "img": _images()}]))


def test_empty_loader():
    with pytest.raises(ValueError, match=r"^X is an empty loader: it yielded no batches"):
        list(iter_image_batches([]))
    with pytest.raises(ValueError, match="^train is an empty loader"):
        list(iter_image_batches(DataLoader(TensorDataset(torch.rand(0, 3, 4, 4))), name="train"))


def test_generator_is_rejected_before_consuming_it():
    consumed = []

    def generate():
        consumed.append(True)
        yield _images()

    gen = generate()
    with pytest.raises(TypeError, match=r"one-shot iterator.*list of batches or a DataLoader"):
        list(iter_image_batches(gen))
    assert not consumed
    with pytest.raises(TypeError, match="one-shot"):
        list(iter_image_batches(iter([_images()])))


@pytest.mark.parametrize("bad", [5, 3.0, None, object()])
def test_non_iterable(bad):
    with pytest.raises(TypeError, match=r"must be a \(N, 3, H, W\) tensor or an iterable of image batches.*got"):
        list(iter_image_batches(bad))


def test_bad_batch_inside_loader_names_its_index():
    loader = [_images(), _images(), torch.rand(2, 8, 8, 3)]
    iterator = iter_image_batches(loader, name="X")
    assert next(iterator) is loader[0]
    assert next(iterator) is loader[1]
    with pytest.raises(ValueError, match=r"^X batch 2 must have shape.*channels-last"):
        next(iterator)


def test_bad_batch_types_inside_loader_name_index():
    with pytest.raises(TypeError, match=r"^X batch 1 must be floating point.*/ 255"):
        list(iter_image_batches([_images(), (torch.zeros(1, 3, 4, 4, dtype=torch.uint8), 0)]))
    with pytest.raises(TypeError, match=r"^X batch 0 must be a torch\.Tensor.*got str"):
        list(iter_image_batches(["not images"]))


def test_one_shot_iterators_allowed_when_read_once():
    batches = (torch.rand(2, 3, 4, 4) for _ in range(2))
    assert len(list(iter_image_batches(batches, reiterable=False))) == 2


def test_check_embeddings_refuses_integer_and_complex_outputs():
    for bad in (torch.ones(2, 4, dtype=torch.int64), torch.ones(2, 4, dtype=torch.complex64)):
        with pytest.raises(TypeError, match="real floating point"):
            check_embeddings(bad, 2)


def test_check_embeddings_refuses_an_all_zero_embedding():
    embeddings = torch.ones(3, 4)
    embeddings[1] = 0
    with pytest.raises(ValueError, match="all-zero embedding"):
        check_embeddings(embeddings, 3)


def test_values_just_outside_the_range_are_shown_exactly():
    images = torch.full((1, 3, 4, 4), 0.5)
    images[0, 0, 0, 0] = 1.0000001
    with pytest.raises(ValueError, match=r"got values in \[0.5, 1.00000012\]"):
        check_images(images)


@pytest.mark.parametrize("data", ["faces/", b"bytes", {"image": 1}])
def test_strings_and_dicts_are_not_taken_for_loaders(data):
    from krtfuap._batches import iter_image_batches

    with pytest.raises(TypeError, match="must be a \\(N, 3, H, W\\) tensor or an iterable of image batches"):
        next(iter_image_batches(data))


# --------------------------------------------------------------------------- FitData


def _face_ids(batches) -> list[int]:
    """Which face each row is, for faces whose first pixel holds their index / 100."""
    return [round(float(face[0, 0, 0]) * 100) for images in batches for face in images]


def _numbered(n: int = 10) -> torch.Tensor:
    faces = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    faces[:, 0, 0, 0] = torch.arange(n) / 100
    return faces


def _orders(data, epochs: int = 3, seed: int = 0) -> list[list[int]]:
    from krtfuap._batches import FitData

    fit = FitData(data, 4, shuffle=True)
    generator = torch.Generator().manual_seed(seed)
    return [_face_ids(images for images, _ in fit.epoch(epoch, generator)) for epoch in range(epochs)]


@pytest.mark.parametrize("kind", ["tensor", "loader"])
def test_fit_data_shuffles_the_faces_of_a_tensor_or_a_loader_from_its_generator(kind):
    faces = _numbered()
    data = faces if kind == "tensor" else DataLoader(TensorDataset(faces), batch_size=4, shuffle=True)
    orders = _orders(data)
    assert all(sorted(order) == list(range(10)) for order in orders)  # every face once per epoch
    assert len({tuple(order) for order in orders}) == 3  # a new order every epoch
    assert _orders(data) == orders and _orders(data, seed=1) != orders  # drawn from the generator alone


def test_fit_data_keeps_a_loader_streaming_with_its_batch_size():
    from krtfuap._batches import FitData

    loader = DataLoader(TensorDataset(_numbered()), batch_size=4)
    fit = FitData(loader, 99, shuffle=True)
    batches = list(fit.epoch(0, torch.Generator().manual_seed(0)))
    assert [len(images) for images, _ in batches] == [4, 4, 2] and all(rows is None for _, rows in batches)
    assert _face_ids(fit) == list(range(10))  # the loader's own order when read in order


def test_fit_data_reorders_the_batches_of_a_list():
    batches = list(_numbered(12).split(3))
    orders = _orders(batches)
    assert all(sorted(order) == list(range(12)) for order in orders)
    for order in orders:  # the faces of a batch stay together
        assert all(order[k:k + 3] == list(range(order[k], order[k] + 3)) for k in range(0, 12, 3))
    assert len({tuple(order) for order in orders}) > 1


def test_fit_data_refuses_to_shuffle_what_streams_in_its_own_order():
    from torch.utils.data import IterableDataset

    from krtfuap._batches import FitData

    class Stream(IterableDataset):
        def __iter__(self):
            yield from _numbered()

    loader = DataLoader(Stream(), batch_size=4)
    with pytest.raises(ValueError, match=r"shuffle=True cannot reorder the faces of X, a DataLoader.*set shuffle=False"):
        FitData(loader, 4, shuffle=True)
    assert _face_ids(FitData(loader, 4)) == list(range(10))


def test_fit_data_reads_a_tensor_in_order_as_views_and_checks_the_size_of_validation_faces():
    from krtfuap._batches import FitData

    faces = _numbered()
    fit = FitData(faces, 4)
    assert fit.size == (4, 4) and fit.is_tensor
    batches = [images for images, _ in fit.epoch(0, None)]
    assert all(images.untyped_storage().data_ptr() == faces.untyped_storage().data_ptr() for images in batches)
    with pytest.raises(ValueError, match=r"share one size; got \(5, 5\) after \(4, 4\)"):
        FitData(torch.rand(2, 3, 5, 5), 4, name="validation", size=fit.size)
