"""swapjax.text: fortune files parsed into documents, the split by document, byte windows, the errors,
and the real corpus (Debian's fortunes).

The real-corpus test skips when the package is not installed, unless SWAPJAX_REQUIRE_REAL_DATA=1
(set by .ci/run as root, where it installs the package): then it fails.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from swapjax import text

FORTUNES_DIR = Path("/usr/share/games/fortunes")


def _write(directory: Path, name: str, docs: list[str], end: str = "%\n") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text("%\n".join(docs) + end)


def _corpus(directory: Path, n: int = 600, seed: int = 0) -> list[bytes]:
    """n distinct documents over two files (and an index, a symlink and a .u8 name that are not read)."""
    rng = np.random.default_rng(seed)
    words = "a fortune is a short saying about life work love and computers".split()
    docs = [f"{i}: " + " ".join(rng.choice(words, rng.integers(3, 25))) + "\n\t\t-- Someone\n" for i in range(n)]
    _write(directory, "alpha", docs[: n // 2])
    _write(directory, "beta", docs[n // 2:], end="")  # no separator after the last fortune
    (directory / "alpha.dat").write_bytes(b"\x00\x02binary index")
    (directory / "alpha.u8").symlink_to("alpha")
    (directory / "link").symlink_to("beta")
    return [d.encode() for d in docs]


def test_documents_are_parsed_in_order_deduplicated_and_blank_ones_dropped(tmp_path):
    _write(tmp_path, "b", ["second\n", "\n\n", "third,\nover two lines\n\n", "  \n"])  # trailing blank lines dropped
    _write(tmp_path, "a", ["first\n", "second\n"], end="")  # read first (sorted names); "second" again in b
    (tmp_path / "c").write_bytes(b"crlf\r\n%\r\n\xc3\xa9t\xc3\xa9\r\n")  # CRLF lines, UTF-8 text
    (tmp_path / ".hidden").write_text("not read\n")
    (tmp_path / "off").mkdir()
    _write(tmp_path / "off", "offensive", ["not read\n"])  # a directory (Debian's off/) is never read
    assert text.documents("fortunes", tmp_path) == [b"first\n", b"second\n", b"third,\nover two lines\n",
                                                    b"crlf\n", "été\n".encode()]


def test_the_split_is_by_document_disjoint_complete_and_in_the_documented_shares(tmp_path):
    docs = _corpus(tmp_path, n=2000)
    splits = {s: text.load("fortunes", s, data_dir=tmp_path) for s in text.SPLITS}
    assert list(text.SPLITS.values()) == [0.9, 0.05, 0.05]
    parts = {}
    for name, split in splits.items():
        stream = split.tokens.tobytes()
        assert split.tokens.dtype == np.uint8 and split.split == name and split.directory == tmp_path
        assert stream.endswith(b"\n%\n")
        parts[name] = [d + b"\n" for d in stream[:-3].split(b"\n%\n")]  # each document, then "%\n"
        assert len(parts[name]) == split.documents
        assert all(text.split_of(d) == name for d in parts[name])
    assert sorted(sum(parts.values(), [])) == sorted(docs)  # every document once, in exactly one split
    for name in text.SPLITS:  # corpus order within a split
        assert parts[name] == [d for d in docs if d in set(parts[name])]
    for name, share in text.SPLITS.items():  # binomial counts: within 4 standard deviations of n·share
        n = len(docs)
        assert abs(len(parts[name]) - n * share) < 4 * np.sqrt(n * share * (1 - share)), (name, len(parts[name]))


def test_a_documents_split_does_not_depend_on_the_other_documents_or_the_run(tmp_path):
    docs = _corpus(tmp_path / "full", n=400)
    _write(tmp_path / "half", "only", [d.decode() for d in docs[::2]])
    again = {s: text.load("fortunes", s, data_dir=tmp_path / "full").tokens for s in text.SPLITS}
    first = {s: text.load("fortunes", s, data_dir=tmp_path / "full").tokens for s in text.SPLITS}
    for s in text.SPLITS:
        np.testing.assert_array_equal(again[s], first[s])
    half = {d: s for s in text.SPLITS
            for d in text.load("fortunes", s, data_dir=tmp_path / "half").tokens.tobytes()[:-3].split(b"\n%\n")}
    assert half and all(text.split_of(d + b"\n") == s for d, s in half.items())
    assert {text.split_of(d) for d in docs} == set(text.SPLITS)


def test_windows_decode_to_the_stream_and_cover_every_target_once(tmp_path):
    _corpus(tmp_path, n=200)
    train = text.load("fortunes", "train", data_dir=tmp_path)
    stream, T = train.tokens.copy(), 32
    w = train.windows(T)
    m = (stream.size - 1) // T
    assert w.shape == (m, T + 1) and w.dtype == np.int32
    assert np.array_equal(train.tokens, stream)  # not mutated
    for i in (0, 1, m // 2, m - 1):
        assert text.decode(w[i]) == stream[i * T: i * T + T + 1].tobytes().decode()
    np.testing.assert_array_equal(w[1:, 0], w[:-1, -1])  # consecutive windows share one byte
    targets = w[:, 1:].ravel()
    np.testing.assert_array_equal(targets, stream[1: m * T + 1])  # every byte after the first once
    np.testing.assert_array_equal(text.windows(np.arange(7) * 30, 3), [[0, 30, 60, 90], [90, 120, 150, 180]])


def test_sample_windows_are_substrings_and_deterministic(tmp_path):
    _corpus(tmp_path, n=200)
    stream = text.load("fortunes", "train", data_dir=tmp_path).tokens
    raw = stream.tobytes()
    a = text.sample_windows(stream, 40, count=50, seed=3)
    assert a.shape == (50, 41) and a.dtype == np.int32
    assert all(raw.find(row.astype(np.uint8).tobytes()) >= 0 for row in a)
    np.testing.assert_array_equal(a, text.sample_windows(stream, 40, count=50, seed=3))
    assert not np.array_equal(a, text.sample_windows(stream, 40, count=50, seed=4))
    edge = text.sample_windows(np.arange(5, dtype=np.uint8), 4, count=3, seed=0)  # one possible offset
    np.testing.assert_array_equal(edge, [[0, 1, 2, 3, 4]] * 3)


def test_encode_decode_round_trip():
    tokens = text.encode("naïve — ok\n")
    assert tokens.dtype == np.uint8 and tokens.size == len("naïve — ok\n".encode())
    assert text.decode(tokens) == "naïve — ok\n" and text.decode(tokens.astype(np.int32)) == "naïve — ok\n"
    np.testing.assert_array_equal(text.encode(b"\x00\xff"), [0, 255])
    assert text.decode(tokens[:3]) == "na\ufffd"  # cut inside a character


def test_missing_corpus_names_the_directory_and_the_apt_command(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as err:
        text.load("fortunes", "train", data_dir=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value) and "apt-get install -y fortunes" in str(err.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "index.dat").write_bytes(b"\x00")  # an index only: no fortune file
    with pytest.raises(FileNotFoundError, match="has no fortune files"):
        text.documents("fortunes", tmp_path / "empty")
    _write(tmp_path / "blank", "x", ["\n", " \n"])
    with pytest.raises(FileNotFoundError, match="no document"):
        text.load("fortunes", "test", data_dir=tmp_path / "blank")
    monkeypatch.setitem(text.CORPORA, "fortunes", (tmp_path / "absent", "fortunes"))  # the default directory
    with pytest.raises(FileNotFoundError, match=r"(?s)absent.*Debian's 'fortunes' package.*apt-get install -y"):
        text.load()


def test_bad_arguments(tmp_path):
    _corpus(tmp_path, n=50)
    with pytest.raises(ValueError, match="split"):
        text.load("fortunes", "valid", data_dir=tmp_path)
    with pytest.raises(ValueError, match="name"):
        text.load("wikitext", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match="no window of length"):
        text.windows(np.arange(4), 4)
    with pytest.raises(ValueError, match="no window of length"):
        text.sample_windows(np.arange(4), 4, count=1, seed=0)
    with pytest.raises(ValueError, match="1-D integer"):
        text.windows(np.zeros((3, 4), np.uint8), 2)
    with pytest.raises(ValueError, match="1-D integer"):
        text.windows(np.zeros(9, np.float32), 2)
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        text.windows(np.array([0, 256, 3]), 1)
    with pytest.raises(ValueError, match="length"):
        text.windows(np.arange(9), 0)
    with pytest.raises(ValueError, match="count"):
        text.sample_windows(np.arange(9), 2, count=0, seed=0)
    with pytest.raises(ValueError, match="str or bytes"):
        text.encode(3)


# ------------------------------------------------------------------------- the real corpus


@pytest.fixture(scope="module")
def fortunes():
    if not (FORTUNES_DIR / "songs-poems").is_file():  # a file of `fortunes`, not of `fortunes-min`
        if os.environ.get("SWAPJAX_REQUIRE_REAL_DATA") == "1":
            pytest.fail(f"SWAPJAX_REQUIRE_REAL_DATA=1 but Debian's fortunes package is missing from {FORTUNES_DIR} "
                        f"(did `apt-get install -y fortunes` fail?)")
        pytest.skip(f"Debian's fortunes package is not installed ({FORTUNES_DIR}); "
                    f"`apt-get install -y fortunes` as root to run this test")
    return text.documents(), {s: text.load("fortunes", s) for s in text.SPLITS}


def test_real_fortunes(fortunes):
    docs, splits = fortunes
    assert text.CORPORA["fortunes"][0] == FORTUNES_DIR
    n, size = len(docs), sum(map(len, docs))
    assert 14_000 < n < 20_000 and 2_000_000 < size < 4_000_000  # Debian 12: 15,134 documents, 2.54 MB
    assert sum(s.documents for s in splits.values()) == n
    for name, share in text.SPLITS.items():
        assert abs(splits[name].documents - n * share) < 4 * np.sqrt(n * share * (1 - share))
    assert splits["test"].tokens.size > 100_000  # enough held-out bytes for a perplexity
    streams = {name: s.tokens.tobytes() for name, s in splits.items()}
    sets = {name: set(stream[:-3].split(b"\n%\n")) for name, stream in streams.items()}
    assert not (sets["train"] & sets["test"]) and not (sets["train"] & sets["validation"])
    assert not (sets["validation"] & sets["test"])
    # English prose: mostly printable ASCII, spaces about one byte in six, 'e' the commonest letter
    counts = np.bincount(splits["train"].tokens, minlength=256)
    printable = counts[32:127].sum() + counts[9] + counts[10]
    assert printable / counts.sum() > 0.999
    assert 0.12 < counts[ord(" ")] / counts.sum() < 0.22
    letters = {chr(c): counts[c] + counts[c - 32] for c in range(ord("a"), ord("z") + 1)}
    assert max(letters, key=letters.get) == "e"
    # the first training document is the first fortune of the first file that lands in train
    first = next(d for d in text._fortunes((FORTUNES_DIR / "art").read_bytes()) if text.split_of(d) == "train")
    assert streams["train"].startswith(first + b"%\n")


def test_the_language_models_page_runs_as_written(fortunes, tmp_path, monkeypatch):
    """docs/language-models.md's python blocks, in order, on the real corpus."""
    import re

    import jax

    page = Path(__file__).resolve().parents[1] / "docs" / "language-models.md"
    blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)
    assert blocks
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "__docs__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page.name}[block {i}]", "exec"), ns)
    result, calibration = ns["result"], ns["calibration"]
    assert result.tokens == 64 * 128 and 1 < result.perplexity < 10_000
    assert result.bits_per_byte == pytest.approx(np.log2(result.perplexity), rel=1e-6)
    assert calibration["tokens"].shape == (128, 129)
    first = jax.tree_util.tree_map(lambda a: a[0], calibration)
    assert np.isfinite(float(ns["loss_fn"](ns["params"], first)))
