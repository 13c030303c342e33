"""Data sets and episodic sampling: real Omniglot zips from ../shared, generated fixtures."""

import functools
import hashlib
import http.server
import io
import pickle
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import shared_data
from fastadapt.data import (EpisodeSampler, Glyphs, ImageFolder, ImageSet, MiniImageNet, Omniglot,
                            maml_protocol)
from fastadapt.data import omniglot as omniglot_module
from fastadapt.data.download import download, extract_zip


@pytest.fixture(scope="module")
def omniglot_root():
    shared_data("omniglot/images_background_small1.zip")
    return shared_data("omniglot/images_background_small2.zip").parent


# ---------------------------------------------------------------- Omniglot (real data)
def test_omniglot_minimal_set_from_zip(omniglot_root):
    data = Omniglot(omniglot_root, "background_small1", cache=False)
    assert data.num_classes == 136 and len(data) == 136 * 20
    assert data.images.shape[1:] == (1, 28, 28) and data.images.dtype == torch.uint8
    assert (data.class_sizes() == 20).all()
    assert {n.split("/")[0] for n in data.class_names} == {"Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"}
    # strokes are bright on a dark background
    assert data.images.float().mean() < 60 and data.images.max() > 200
    assert set(data.targets[data.indices_of("Greek/character01")].tolist()) == {data.class_names.index("Greek/character01")}


def test_omniglot_alphabets_rotations_and_errors(omniglot_root, tmp_path):
    greek = Omniglot(omniglot_root, "background_small2", alphabets=["Greek"], cache=False)
    assert greek.num_classes == 24 and all(n.startswith("Greek/") for n in greek.class_names)
    rotated = Omniglot(omniglot_root, "background_small2", alphabets=["Greek"], rotations=True, cache=False)
    assert rotated.num_classes == 4 * 24 and len(rotated) == 4 * len(greek)
    first = rotated.indices_of("Greek/character01")
    quarter = rotated.indices_of("Greek/character01/rot90")
    assert torch.equal(rotated.images[quarter], torch.rot90(rotated.images[first], 1, dims=(2, 3)))
    with pytest.raises(ValueError, match="no alphabet"):
        Omniglot(omniglot_root, "background_small2", alphabets=["Klingon"], cache=False)
    with pytest.raises(ValueError, match="split must be one of"):
        Omniglot(omniglot_root, "training")
    with pytest.raises(FileNotFoundError, match=r"images_evaluation.*download=True"):
        Omniglot(tmp_path, "evaluation")


def test_omniglot_folder_equals_zip_and_cache_round_trips(omniglot_root, tmp_path):
    extract_zip(omniglot_root / "images_background_small1.zip", tmp_path)
    from_zip = Omniglot(omniglot_root, "background_small1", alphabets=["Latin"], cache=False)
    from_folder = Omniglot(tmp_path, "background_small1", alphabets=["Latin"], cache=True)
    assert from_folder.class_names == from_zip.class_names
    assert torch.equal(from_folder.images, from_zip.images)
    assert len(list(tmp_path.glob("*.npy"))) == 1
    cached = Omniglot(tmp_path, "background_small1", alphabets=["Latin"], cache=True)
    assert torch.equal(cached.images, from_zip.images)


def test_maml_protocol_splits_disjoint_characters(omniglot_root):
    train, val, test = maml_protocol(omniglot_root, train_classes=150, val_classes=20, rotations=False,
                                     splits=("background_small1", "background_small2"))
    # Greek (24) and Latin (26) are in both minimal sets and count once: 136 + 156 - 50
    assert (train.num_classes, val.num_classes, test.num_classes) == (130, 20, 242 - 150)
    names = [set(s.class_names) for s in (train, val, test)]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    again = maml_protocol(omniglot_root, train_classes=150, val_classes=20, rotations=False,
                          splits=("background_small1", "background_small2"))
    assert again[2].class_names == test.class_names
    rotated = maml_protocol(omniglot_root, train_classes=150, rotations=True,
                            splits=("background_small1", "background_small2"))
    assert rotated[0].num_classes == 4 * 150 and rotated[1].num_classes == 0


# ---------------------------------------------------------------- sampling
def coded_set(classes=12, per_class=(6, 7, 8)):
    """Images whose pixels encode (class, index), so episodes can be checked exactly."""
    sizes = [per_class[c % len(per_class)] for c in range(classes)]
    targets = torch.arange(classes).repeat_interleave(torch.tensor(sizes))
    n = len(targets)
    images = torch.zeros(n, 1, 1, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = targets.to(torch.uint8)
    images[:, 0, 0, 1] = torch.arange(n, dtype=torch.uint8)
    return ImageSet(images, targets, [f"c{c}" for c in range(classes)])


def decode(x):
    codes = (x * 255).round().long()
    return codes[..., 0, 0, 0], codes[..., 0, 0, 1]


def test_episode_structure_labels_and_disjoint_support_query():
    sampler = EpisodeSampler(coded_set(), n_way=4, k_shot=2, k_query=3, batch_size=16, seed=5)
    batch = next(iter(sampler))
    assert batch.support_x.shape == (16, 8, 1, 1, 2) and batch.query_x.shape == (16, 12, 1, 1, 2)
    assert batch.support_x.dtype == torch.float32 and 0 <= batch.support_x.min() and batch.support_x.max() <= 1
    s_class, s_index = decode(batch.support_x)
    q_class, q_index = decode(batch.query_x)
    mappings = set()
    for t in range(16):
        assert sorted(batch.support_y[t].tolist()) == sorted([0, 1, 2, 3] * 2)
        assert sorted(batch.query_y[t].tolist()) == sorted([0, 1, 2, 3] * 3)
        label_to_class = {}
        for cls, label in zip(s_class[t].tolist() + q_class[t].tolist(),
                              batch.support_y[t].tolist() + batch.query_y[t].tolist()):
            assert label_to_class.setdefault(label, cls) == cls
        assert len(set(label_to_class.values())) == 4
        assert not set(s_index[t].tolist()) & set(q_index[t].tolist())
        assert len(set(s_index[t].tolist() + q_index[t].tolist())) == 20
        mappings.add(tuple(sorted(label_to_class.items())))
    assert len(mappings) > 1


def episode_digest(seed, count):
    sampler = EpisodeSampler(coded_set(), 3, 1, 2, 4, seed=seed)
    digest = hashlib.sha256()
    for _, batch in zip(range(count), sampler):
        for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y):
            digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def test_episodes_are_deterministic_across_processes():
    code = "import sys; sys.path.insert(0, 'tests'); from test_data import episode_digest; print(episode_digest(7, 5))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert other.stdout.strip() == episode_digest(7, 5)
    assert episode_digest(8, 5) != episode_digest(7, 5)


def test_dataloader_workers_give_the_same_episodes_without_repeats():
    sampler = EpisodeSampler(coded_set(), 3, 1, 2, 4, seed=3)
    direct = [b for _, b in zip(range(6), EpisodeSampler(coded_set(), 3, 1, 2, 4, seed=3))]
    loader = torch.utils.data.DataLoader(sampler, batch_size=None, num_workers=2)
    loaded = [b for _, b in zip(range(6), loader)]
    for a, b in zip(direct, loaded):
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)
    keys = {b.support_x.numpy().tobytes() for b in loaded}
    assert len(keys) == 6


def test_fixed_episodes_repeat_and_resume_state():
    sampler = EpisodeSampler(coded_set(), 3, 1, 2, 4, seed=3)
    first, second = sampler.fixed(3), sampler.fixed(3)
    assert all(torch.equal(a.query_x, b.query_x) for a, b in zip(first, second))
    assert not torch.equal(first[0].support_x, next(iter(sampler)).support_x)
    sampler = EpisodeSampler(coded_set(), 3, 1, 2, 4, seed=3)
    stream = iter(sampler)
    episodes = [next(stream) for _ in range(4)]
    resumed = EpisodeSampler(coded_set(), 3, 1, 2, 4, seed=0)
    resumed.load_state_dict({"seed": 3, "start": 2})
    assert torch.equal(next(iter(resumed)).support_x, episodes[2].support_x)
    assert sampler.state_dict() == {"seed": 3, "start": 4}


@pytest.mark.parametrize("kwargs, message", [
    ({"n_way": 13}, "n_way=13 is larger than the 12 classes"),
    ({"k_shot": 5, "k_query": 2}, "larger than class 'c0', which has 6 images"),
    ({"k_shot": 0}, "k_shot must be a positive integer"),
    ({"batch_size": -1}, "batch_size must be a positive integer"),
])
def test_sampler_rejects_impossible_settings(kwargs, message):
    settings = {"n_way": 3, "k_shot": 1, "k_query": 1, "batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        EpisodeSampler(coded_set(), **settings)


def test_sampler_on_real_omniglot_shapes(omniglot_root):
    data = Omniglot(omniglot_root, "background_small1", cache=False)
    batch = next(iter(EpisodeSampler(data, 5, 1, 15, 32)))
    assert batch.support_x.shape == (32, 5, 1, 28, 28) and batch.query_x.shape == (32, 75, 1, 28, 28)


# ---------------------------------------------------------------- miniImageNet layouts (fixtures)
def colour(label, i):
    return (40 * label % 256, 7 * i % 256, 200)


@pytest.fixture
def mini_root(tmp_path):
    (tmp_path / "images").mkdir()
    for split, labels in (("train", ["n01", "n02", "n03"]), ("val", ["n04", "n05"])):
        rows = ["filename,label"]
        for li, label in enumerate(labels):
            for i in range(4):
                name = f"{label}{i:08d}.jpg"
                Image.new("RGB", (100, 90), colour(li, i)).save(tmp_path / "images" / name)
                rows.append(f"{name},{label}")
        (tmp_path / f"{split}.csv").write_text("\n".join(rows) + "\n")
    images = np.zeros((6, 84, 84, 3), dtype=np.uint8)
    images[:, :, :, 0] = np.arange(6)[:, None, None] * 30
    with open(tmp_path / "mini-imagenet-cache-test.pkl", "wb") as handle:
        pickle.dump({"image_data": images, "class_dict": {"n09": [0, 2, 4], "n08": [1, 3, 5]}}, handle)
    return tmp_path


def test_miniimagenet_csv_layout(mini_root):
    train = MiniImageNet(mini_root, "train", image_size=16)
    assert train.num_classes == 3 and len(train) == 12 and train.images.shape[1:] == (3, 16, 16)
    assert train.class_names == ["n01", "n02", "n03"]
    assert (train.class_sizes() == 4).all()
    assert len(list(mini_root.glob("*.npy"))) == 1
    again = MiniImageNet(mini_root, "train", image_size=16)
    assert torch.equal(again.images, train.images)
    val = MiniImageNet(mini_root, "val", image_size=16, cache=False)
    assert val.num_classes == 2


def test_miniimagenet_pickle_cache_and_unsafe_pickle(mini_root):
    test = MiniImageNet(mini_root, "test")
    assert test.class_names == ["n08", "n09"] and test.images.shape == (6, 3, 84, 84)
    assert test.targets.tolist() == [1, 0, 1, 0, 1, 0]
    assert test.images[1, 0, 0, 0] == 30
    (mini_root / "mini-imagenet-cache-train.pkl").write_bytes(pickle.dumps({"image_data": functools.partial(print)}))
    with pytest.raises(ValueError, match="refusing to load"):
        MiniImageNet(mini_root, "train")


def test_miniimagenet_missing_files(tmp_path, mini_root):
    with pytest.raises(FileNotFoundError, match="mini-imagenet-cache-train.pkl"):
        MiniImageNet(tmp_path / "nothing-here", "train")
    (mini_root / "images" / "n0100000000.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="n0100000000.jpg"):
        MiniImageNet(mini_root, "train", cache=False)


# ---------------------------------------------------------------- a user's own folder
@pytest.fixture
def folder_root(tmp_path):
    for c, name in enumerate(["cat", "dog"]):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (30 + i, 20), (100 * c, 50, 50)).save(tmp_path / name / f"{i}.{'png' if i else 'jpg'}")
    return tmp_path


def test_image_folder_reads_classes_any_format(folder_root):
    data = ImageFolder(folder_root, image_size=12, channels=3)
    assert data.class_names == ["cat", "dog"] and len(data) == 6 and data.images.shape[1:] == (3, 12, 12)
    assert ImageFolder(folder_root, image_size=12, channels=1).images.shape[1] == 1


def test_image_folder_corrupt_file_is_reported_never_mislabelled(folder_root):
    bad = folder_root / "dog" / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        ImageFolder(folder_root)
    with pytest.warns(UserWarning, match="broken.png"):
        data = ImageFolder(folder_root, on_error="skip")
    assert data.class_sizes().tolist() == [3, 3]
    assert bad not in data.files


def test_image_folder_errors(folder_root, tmp_path):
    (folder_root / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        ImageFolder(folder_root)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ImageFolder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="channels"):
        ImageFolder(folder_root, channels=2)


# ---------------------------------------------------------------- Glyphs
def test_glyphs_deterministic_disjoint_and_class_structured():
    a, b = Glyphs(num_classes=6, examples_per_class=5, seed=1), Glyphs(num_classes=6, examples_per_class=5, seed=1)
    assert torch.equal(a.images, b.images) and a.images.shape == (30, 1, 28, 28)
    test = Glyphs(num_classes=6, examples_per_class=5, seed=1, split="test")
    assert not set(a.class_names) & set(test.class_names)
    assert not torch.equal(a.images, test.images)
    x = a.images.float().flatten(1) / 255
    distance = torch.cdist(x, x)
    same = a.targets[:, None] == a.targets[None, :]
    off_diagonal = ~torch.eye(len(x), dtype=torch.bool)
    assert distance[same & off_diagonal].mean() < 0.8 * distance[~same].mean()
    assert a.images.max() > 200 and a.images.float().mean() < 80
    with pytest.raises(ValueError, match="split"):
        Glyphs(split="holdout")


def test_glyphs_cache_gives_the_drawn_images_and_survives_a_damaged_file(tmp_path):
    from fastadapt.data import glyphs

    drawn = Glyphs(num_classes=4, examples_per_class=3, seed=7, cache=False).images
    glyphs._class_images.cache_clear()  # draw again, not from this process's memory
    first = Glyphs(num_classes=4, examples_per_class=3, seed=7, cache=tmp_path).images
    [file] = tmp_path.glob("glyphs-train-seed7-4x3-28px.*.npy")
    assert torch.equal(first, drawn) and torch.equal(Glyphs(4, 3, seed=7, cache=tmp_path).images, drawn)
    file.write_bytes(b"not an array")
    assert torch.equal(Glyphs(4, 3, seed=7, cache=tmp_path).images, drawn)
    assert torch.equal(torch.from_numpy(np.load(file)), drawn)  # rewritten


# ---------------------------------------------------------------- download and extraction
def test_extract_zip_refuses_path_escape(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok/file.txt", "fine")
        zf.writestr("../escaped.txt", "bad")
    with pytest.raises(ValueError, match=r"outside"):
        extract_zip(archive, tmp_path / "target")
    assert not (tmp_path / "escaped.txt").exists()


@pytest.fixture
def http_folder(tmp_path):
    """Serve tmp_path/'served' on a loopback port; yields (folder, base_url)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_verifies_checksum(http_folder, tmp_path):
    served, url = http_folder
    (served / "blob.bin").write_bytes(b"payload")
    good = hashlib.sha256(b"payload").hexdigest()
    with pytest.raises(ValueError, match="checksum mismatch"):
        download(f"{url}/blob.bin", tmp_path / "out" / "blob.bin", "sha256:" + "0" * 64)
    assert not any((tmp_path / "out").iterdir())
    path = download(f"{url}/blob.bin", tmp_path / "out" / "blob.bin", "sha256:" + good)
    assert path.read_bytes() == b"payload"


def test_omniglot_download_fetches_verifies_and_extracts(http_folder, tmp_path, monkeypatch, omniglot_root):
    served, url = http_folder
    source = omniglot_root / "images_background_small2.zip"
    (served / source.name).write_bytes(source.read_bytes())
    monkeypatch.setattr(omniglot_module, "_URL", url + "/{}.zip")
    data = Omniglot(tmp_path / "root", "background_small2", download=True, alphabets=["Tagalog"], cache=False)
    assert data.num_classes == 17
    assert (tmp_path / "root" / "images_background_small2" / "Tagalog").is_dir()
    monkeypatch.setitem(omniglot_module.CHECKSUMS, "images_background_small1", "sha256:" + "1" * 64)
    (served / "images_background_small1.zip").write_bytes(source.read_bytes())
    with pytest.raises(ValueError, match="checksum mismatch"):
        Omniglot(tmp_path / "root", "background_small1", download=True)


def test_images_of_any_mode_and_depth_are_converted_by_value_range_or_refused_by_their_mode():
    import io
    from PIL import Image
    from fastadapt.data import ImageTransform
    grey = ImageTransform(8, 1)
    levels = np.linspace(0, 65535, 64).reshape(8, 8).astype(np.uint16)
    eight = np.rint(levels / 257).astype(np.uint8)

    def encoded(image, fmt, **kw):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **kw)
        return buffer.getvalue()

    np.testing.assert_array_equal(grey.decode(encoded(Image.fromarray(levels), "PNG"), "16.png", True)[0], eight)
    floats = Image.fromarray((eight / 255).astype(np.float32), mode="F")
    assert np.abs(grey.decode(encoded(floats, "TIFF"), "f.tif", True)[0].astype(int) - eight).max() <= 1
    webp = encoded(Image.fromarray(eight).convert("RGB"), "WEBP", lossless=True)   # WebP has no grey mode
    assert Image.open(io.BytesIO(webp)).mode == "RGB"
    np.testing.assert_array_equal(grey.decode(webp, "g.webp", True)[0], eight)
    drawing = np.zeros((8, 8, 4), np.uint8)
    drawing[2:4, 2:4] = [0, 0, 0, 255]   # black strokes on a transparent background: strokes on white paper
    decoded = grey.decode(Image.fromarray(drawing, "RGBA"), "t.png", True)[0]
    assert decoded[0, 0] == 255 and decoded[2, 2] == 0
    colour = np.zeros((8, 8, 4), np.uint8)
    colour[..., 0], colour[..., 3] = 200, 255
    with pytest.raises(ValueError, match=r"c.png: image has 3 channel\(s\) \(RGBA: colour with alpha\), expected 1"):
        grey.decode(Image.fromarray(colour, "RGBA"), "c.png", True)
    palette = Image.fromarray(colour[..., :3]).convert("P")
    with pytest.raises(ValueError, match=r"image has 3 channel\(s\) \(P: palette\)"):
        grey.decode(palette, "p.png", True)


# ---------------------------------------------------------------- framing drawings
def _omniglot_drawing(root) -> Image.Image:
    with zipfile.ZipFile(root / "images_background_small2.zip") as archive:
        member = next(n for n in archive.namelist() if n.endswith(".png") and "Sanskrit" in n)
        return Image.open(io.BytesIO(archive.read(member))).convert("L")


def _ink_box(image: np.ndarray, threshold: int = 64):
    rows, columns = np.flatnonzero((image > threshold).any(1)), np.flatnonzero((image > threshold).any(0))
    return rows[0], rows[-1] + 1, columns[0], columns[-1] + 1


def test_frame_gives_a_drawing_one_size_and_place_whatever_page_it_is_on(omniglot_root):
    from fastadapt.data import ImageTransform
    drawing = _omniglot_drawing(omniglot_root)
    framed, whole = ImageTransform(28, invert=True, frame=0.8), ImageTransform(28, invert=True)
    reference = framed.decode(drawing)[0].astype(int)
    top, bottom, left, right = _ink_box(reference)
    assert abs(max(bottom - top, right - left) - 0.8 * 28) <= 1.5
    assert abs((top + bottom) / 2 - 14) <= 1 and abs((left + right) / 2 - 14) <= 1
    for scale, corner, page in ((0.5, (200, 10), (300, 200)), (0.7, (0, 0), (150, 400)), (2.0, (30, 60), (400, 400))):
        moved = Image.new("L", page, 255)
        side = round(105 * scale)
        moved.paste(drawing.resize((side, side), Image.Resampling.LANCZOS), corner)
        difference = np.abs(framed.decode(moved)[0].astype(int) - reference).mean()
        unframed = np.abs(whole.decode(moved)[0].astype(int) - whole.decode(drawing)[0].astype(int)).mean()
        assert difference < 6 and unframed > 3 * difference, (scale, difference, unframed)
    # light strokes on a dark page (the other polarity) and an RGB file frame the same drawing
    dark = Image.fromarray(255 - np.asarray(drawing))
    np.testing.assert_array_equal(ImageTransform(28, frame=0.8).decode(dark)[0], reference)
    np.testing.assert_array_equal(ImageTransform(28, 3, invert=True, frame=0.8).decode(drawing.convert("RGB"))[0],
                                  reference)
    specks = np.asarray(drawing).copy()   # dust on the scan does not stretch the frame
    specks[[2, 3, 101, 50], [2, 100, 4, 103]] = 0
    with_specks = framed.decode(Image.fromarray(specks))[0].astype(int)
    assert np.abs(with_specks - reference).mean() < 1   # the specks may show, but the drawing stays put
    hairline = np.full((105, 105), 255, np.uint8)   # a drawing thinner than the speck filter is still framed
    hairline[10:40, 60] = 0
    top, bottom, left, right = _ink_box(framed.decode(Image.fromarray(hairline))[0], threshold=30)
    assert bottom - top >= 21 and abs((top + bottom) / 2 - 14) <= 1
    blank = Image.new("L", (105, 105), 255)   # no ink: read whole, and said
    with pytest.warns(UserWarning, match="blank.png: no drawing found to frame"):
        np.testing.assert_array_equal(framed.decode(blank, "blank.png"), whole.decode(blank))


@pytest.mark.parametrize("value", [0, 1e-300, 0.09, -0.5, 1.5, True, "0.8", float("nan"), float("inf")])
def test_frame_must_be_a_fraction(value):
    from fastadapt.data import ImageTransform
    with pytest.raises(ValueError, match=r"ImageTransform: frame must be a fraction from 0.1 to 1"):
        ImageTransform(28, frame=value)


def test_omniglot_frame_reaches_its_images_transform_and_cache(omniglot_root, tmp_path):
    plain = Omniglot(omniglot_root, "background_small2", alphabets=["Sanskrit"])
    framed = Omniglot(omniglot_root, "background_small2", alphabets=["Sanskrit"], frame=0.8)
    assert framed.transform.frame == 0.8 and plain.transform.frame is None
    archive, member = framed.sources[7].rsplit(".zip:", 1)
    with zipfile.ZipFile(archive + ".zip") as opened:
        np.testing.assert_array_equal(framed.images[7].numpy(), framed.transform.decode(opened.read(member)))
    assert not torch.equal(framed.images, plain.images)
    cached = Omniglot(omniglot_root, "background_small2", alphabets=["Sanskrit"], frame=0.8, cache=tmp_path)
    again = Omniglot(omniglot_root, "background_small2", alphabets=["Sanskrit"], cache=tmp_path)
    assert torch.equal(cached.images, framed.images) and torch.equal(again.images, plain.images)
