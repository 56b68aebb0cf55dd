"""read_captions on local paths, file:// and a real moto S3 server: COCO JSON, txt, parquet, csv, errors."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.captions import read_captions

# The schema of COCO's annotations/captions_val2014.json, cut to 2 images and 5 captions.
COCO = {
    "info": {
        "description": "This is stable 1.0 version of the 2014 MS COCO dataset.",
        "url": "http://mscoco.org",
        "version": "1.0",
        "year": 2014,
        "contributor": "Microsoft COCO group",
        "date_created": "2015-01-27 09:11:52.357475",
    },
    "images": [
        {
            "license": 3,
            "file_name": "COCO_val2014_000000391895.jpg",
            "coco_url": "http://mscoco.org/images/391895",
            "height": 360,
            "width": 640,
            "date_captured": "2013-11-14 11:18:45",
            "flickr_url": "http://farm9.staticflickr.com/8186/8119368305_4e622c8349_z.jpg",
            "id": 391895,
        },
        {
            "license": 4,
            "file_name": "COCO_val2014_000000522418.jpg",
            "coco_url": "http://mscoco.org/images/522418",
            "height": 480,
            "width": 640,
            "date_captured": "2013-11-14 11:38:44",
            "flickr_url": "http://farm1.staticflickr.com/1/127244861_ab0c0381e7_z.jpg",
            "id": 522418,
        },
    ],
    "licenses": [
        {"url": "http://creativecommons.org/licenses/by-nc/2.0/", "id": 3, "name": "CC BY-NC"},
    ],
    "annotations": [
        {"image_id": 391895, "id": 770337, "caption": "A man with a red helmet on a moped on a road. "},
        {"image_id": 522418, "id": 770354, "caption": "A woman wearing a net on her head cutting a cake. "},
        {"image_id": 391895, "id": 771687, "caption": "Man riding a motor bike on a dirt road."},
        {"image_id": 522418, "id": 771733, "caption": "A woman cutting a large white sheet cake.\n"},
        {"image_id": 391895, "id": 772707, "caption": " A man riding on the back of a motorcycle.\n "},
    ],
}
COCO_PROMPTS = [
    "A man with a red helmet on a moped on a road.",
    "A woman wearing a net on her head cutting a cake.",
    "Man riding a motor bike on a dirt road.",
    "A woman cutting a large white sheet cake.",
    "A man riding on the back of a motorcycle.",
]


NO_DEFAULT = "no column 'caption', 'prompt', 'text' "


def write(path, data: str | bytes) -> str:
    """Write `data` at `path` (a pathlib.Path) and return it as a plain string path."""
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def parquet_bytes(columns: dict) -> bytes:
    """A parquet file of `columns` as bytes."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue().to_pybytes()


def raises_one_line(exc_type, url: str, match: str, **kwargs) -> str:
    """read_captions(url, **kwargs) raises `exc_type` with a one-line message naming `url`; the message."""
    with pytest.raises(exc_type, match=match) as info:
        read_captions(url, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert url in message
    return message


def test_coco_json_local_path_and_file_url(tmp_path):
    path = write(tmp_path / "captions_val2014.json", json.dumps(COCO, indent=2))
    assert read_captions(path) == COCO_PROMPTS
    assert read_captions(f"file://{path}") == COCO_PROMPTS


def test_coco_json_on_s3(store_factory, s3_endpoint):
    store = store_factory("s3")
    store.write_bytes("annotations/captions_train2014.json", json.dumps(COCO).encode())
    url = store.url("annotations/captions_train2014.json")
    assert url.startswith("s3://")
    assert read_captions(url, endpoint_url=s3_endpoint) == COCO_PROMPTS


def test_coco_blank_captions_are_dropped_and_counted(tmp_path, caplog):
    coco = dict(COCO, annotations=COCO["annotations"] + [{"image_id": 1, "id": 2, "caption": " \n"}])
    path = write(tmp_path / "c.json", json.dumps(coco))
    with caplog.at_level(logging.WARNING, logger="storage.captions"):
        assert read_captions(path) == COCO_PROMPTS
    assert "dropped 1 blank or null of 6 entries" in caplog.text


def test_json_list_of_strings(tmp_path):
    path = write(tmp_path / "prompts.json", json.dumps(["  a cat ", "a dog\n", ""]))
    assert read_captions(path) == ["a cat", "a dog"]


def test_txt_one_prompt_a_line_skips_blank_lines(tmp_path):
    path = write(tmp_path / "prompts.TXT", "\ufeffa red car \n\n   \nan astronaut riding a horse\r\n\n")
    assert read_captions(path) == ["a red car", "an astronaut riding a horse"]


def test_parquet_named_and_default_column(tmp_path):
    columns = {"id": [1, 2], "caption": [" a ", "b"], "alt": ["x", None]}
    path = write(tmp_path / "p.parquet", parquet_bytes(columns))
    assert read_captions(path) == ["a", "b"]
    assert read_captions(path, column="alt") == ["x"]
    for name in ("prompt", "text"):
        only = write(tmp_path / f"{name}.parquet", parquet_bytes({"id": [1], name: [f"{name} one "]}))
        assert read_captions(only) == [f"{name} one"]


def test_csv_named_and_default_column(tmp_path):
    text = 'id,prompt,note\n1," a cat, sitting ",x\n2,"a dog\nrunning",y\n\n3,  ,z\n'
    path = write(tmp_path / "p.csv", text)
    assert read_captions(path) == ["a cat, sitting", "a dog\nrunning"]
    assert read_captions(path, column="note") == ["x", "y", "z"]
    assert read_captions(path, column="id") == ["1", "2", "3"]


def test_missing_file_local_and_s3(tmp_path, s3_endpoint):
    url = str(tmp_path / "nope.json")
    raises_one_line(FileNotFoundError, url, "not found")
    s3_url = "s3://dmd-test/missing/captions.txt"
    secret = "do-not-print-this-secret"
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": secret}
    message = raises_one_line(FileNotFoundError, s3_url, "not found", **options)
    assert secret not in message


def test_unreadable_path_is_value_error(tmp_path):
    url = str(tmp_path / "folder.txt")
    (tmp_path / "folder.txt").mkdir()
    raises_one_line(ValueError, url, "cannot read it")


def test_unknown_suffix_hides_url_credentials():
    url = "s3://user:hunter2@bucket/captions.xml"
    with pytest.raises(ValueError, match="unknown suffix '.xml'") as info:
        read_captions(url)
    message = str(info.value)
    assert "\n" not in message and "s3://bucket/captions.xml" in message and "hunter2" not in message


@pytest.mark.parametrize(
    "name, data, match",
    [
        ("bad.json", '{"annotations": [\n{"caption": "x"},,]}', "invalid JSON at line 2 column 18"),
        ("images.json", json.dumps({"images": COCO["images"]}), 'no "annotations" with "caption"'),
        ("nocap.json", json.dumps({"annotations": [{"id": 2}]}), 'no "annotations" with "caption"'),
        ("num.json", json.dumps({"annotations": [{"caption": 3}]}), 'annotation 0: "caption" is int, not a'),
        ("mixed.json", json.dumps(["a", 2]), "JSON list item 1 is int, not a string"),
        ("scalar.json", "42", 'no "annotations" with "caption"'),
        ("blank.json", json.dumps({"annotations": [{"caption": " \n"}]}), r"no prompts \(1 entries, all"),
        ("empty.txt", "", r"no prompts \(the file holds none\)"),
        ("blank.txt", "\n  \n\t\n", r"no prompts \(3 entries, all blank"),
        ("latin1.txt", "caf\xe9".encode("latin-1"), r"not UTF-8 text \(byte 3\)"),
        ("empty.csv", "", r"empty CSV \(no header row\)"),
        ("nocol.csv", "id,title\n1,x\n", NO_DEFAULT + r"\(columns: 'id', 'title'\)"),
        ("ragged.csv", "caption,id\na,1\nb\n", "CSV row 2 has 1 fields, the header has 2"),
        ("blank.csv", "caption\n \n\n", r"no prompts \(1 entries, all blank"),
        ("nocol.parquet", parquet_bytes({"id": [1]}), NO_DEFAULT + r"\(columns: 'id'\)"),
        ("ints.parquet", parquet_bytes({"caption": [1, 2]}), "column 'caption' holds int at row 0, not text"),
        ("junk.parquet", b"not parquet at all", "not a readable parquet file"),
        ("nulls.parquet", parquet_bytes({"caption": pa.array([None], pa.string())}), "no prompts"),
    ],
)
def test_bad_content_raises_one_line_naming_the_file(tmp_path, name, data, match):
    url = write(tmp_path / name, data)
    raises_one_line(ValueError, url, match)


def test_missing_named_column(tmp_path):
    for name, data in [("p.parquet", parquet_bytes({"caption": ["a"]})), ("p.csv", "caption\na\n")]:
        url = write(tmp_path / name, data)
        raises_one_line(ValueError, url, r"no column 'prompts' \(columns: 'caption'\)", column="prompts")


def test_column_with_json_or_txt_is_rejected(tmp_path):
    url = write(tmp_path / "c.json", json.dumps(COCO))
    raises_one_line(ValueError, url, "applies only to .parquet and .csv", column="caption")


def test_s3_content_error_names_the_s3_url(store_factory, s3_endpoint):
    store = store_factory("s3")
    store.write_bytes("bad.json", b"{not json")
    url = store.url("bad.json")
    raises_one_line(ValueError, url, "invalid JSON", endpoint_url=s3_endpoint)
