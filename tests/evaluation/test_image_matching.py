"""image_matching.match_images: records are the JSON's images by id AND file name, or by file name alone.

Pure Python (no TensorFlow, no files): the records are (id, file name) lists as read_record_names returns
them, the JSON images dicts as in a COCO file. The cases are the issue's: TXT line numbers 1..N against a
Roboflow export numbered 0..N-1, a training JSON given for validation records, and the same files under
other ids.
"""
import pytest

from maskrcnn_tf.evaluation.image_matching import FILE_NAME, ID_AND_FILE_NAME, basename, match_images

NAMES = [f"img_{i}.jpg" for i in range(5)]


def _json_images(ids, names):
    return [{"id": i, "file_name": n, "height": 10, "width": 10} for i, n in zip(ids, names)]


def test_records_equal_to_the_json_match_by_id_and_name():
    ids = [1, 2, 3, 4, 5]
    match = match_images(ids, NAMES, _json_images(ids, NAMES))
    assert match.match_by == ID_AND_FILE_NAME
    assert match.json_id_of == {i: i for i in ids} and match.renumbered == 0 and match.notes == ()
    # Extra JSON images (a whole val2017 for a few records) are fine; a directory in the record name too.
    json_images = _json_images(range(1, 100), NAMES + [f"x{i}.jpg" for i in range(94)])
    match = match_images([2], ["sub dir/img_1.jpg"], json_images)
    assert match.json_id_of == {2: 2}


def test_off_by_one_ids_name_the_first_record_both_names_the_count_and_the_flag():
    # TXT records: line numbers 1..5; the Roboflow export of the same files: ids 0..4.
    record_ids = [1, 2, 3, 4, 5]
    with pytest.raises(ValueError) as info:
        match_images(record_ids, NAMES, _json_images(range(5), NAMES))
    message = str(info.value)
    assert "\n" not in message
    # Record 1 is img_0.jpg, but the JSON's image 1 is img_1.jpg; records 1..4 are shifted, record 5 has
    # no JSON image: 5 of 5 disagree.
    assert message.startswith("record image id 1 is 'img_0.jpg' but the JSON's image 1 is 'img_1.jpg'"), message
    assert "(5 of 5 records disagree in id or file name)" in message, message
    assert "the file names match the JSON's one to one under other ids (5 renumbered" in message
    assert message.endswith("rerun with --match_by=file_name")
    # With the flag every record takes the JSON id of its file: line number - 1.
    match = match_images(record_ids, NAMES, _json_images(range(5), NAMES), FILE_NAME)
    assert match.json_id_of == {1: 0, 2: 1, 3: 2, 4: 3, 5: 4} and match.renumbered == 5
    assert match.to_json_ids([5, 1, 3]).tolist() == [4, 0, 2]
    assert "5 of them have another id there" in match.notes[0]


def test_train_json_for_val_records_is_refused_without_the_flag_hint():
    # Same ids 1..3, other files: the training split's JSON.
    with pytest.raises(ValueError) as info:
        match_images([1, 2, 3], ["val_a.jpg", "val_b.jpg", "val_c.jpg"],
                     _json_images([1, 2, 3, 4], ["tr_a.jpg", "tr_b.jpg", "tr_c.jpg", "tr_d.jpg"]))
    message = str(info.value)
    assert message.startswith("record image id 1 is 'val_a.jpg' but the JSON's image 1 is 'tr_a.jpg'"), message
    assert "3 of 3 records disagree" in message and "the right split" in message
    assert "--match_by" not in message  # matching by name would not help
    with pytest.raises(ValueError, match=r"record image id 1 is 'val_a.jpg', and no image of the JSON has the file "
                                         r"name 'val_a.jpg' \(3 of 3 records"):
        match_images([1, 2, 3], ["val_a.jpg", "val_b.jpg", "val_c.jpg"],
                     _json_images([1, 2, 3, 4], ["tr_a.jpg", "tr_b.jpg", "tr_c.jpg", "tr_d.jpg"]), FILE_NAME)


def test_same_files_under_other_ids():
    json_ids = [70, 10, 30, 50, 90]  # renumbered and reordered by an export tool
    with pytest.raises(ValueError, match=r"^record image id 1 \('img_0.jpg'\) is not in the annotation file \(5 of 5 "
                                         r"records .*rerun with --match_by=file_name$"):
        match_images([1, 2, 3, 4, 5], NAMES, _json_images(json_ids, NAMES))
    match = match_images([1, 2, 3, 4, 5], NAMES, _json_images(json_ids, NAMES), FILE_NAME)
    assert match.json_id_of == {1: 70, 2: 10, 3: 30, 4: 50, 5: 90}
    assert match.json_ids == [10, 30, 50, 70, 90]
    with pytest.raises(ValueError, match="record image id 6 was not in the records scanned"):
        match.to_json_ids([6])


def test_one_mismatch_among_matches_is_counted_and_named():
    names = list(NAMES)
    json_names = list(NAMES)
    json_names[3] = "other.jpg"
    with pytest.raises(ValueError, match=r"^record image id 4 is 'img_3.jpg' but the JSON's image 4 is 'other.jpg' "
                                         r"\(1 of 5 records .*the right split"):
        match_images([1, 2, 3, 4, 5], names, _json_images([1, 2, 3, 4, 5], json_names))
    # Basenames are compared exactly: case counts, directories (either slash) do not.
    assert basename("a\\b\\c.JPG") == "c.JPG" and basename("a/b/c.jpg") == "c.jpg"
    with pytest.raises(ValueError, match="1 of 1 records"):
        match_images([1], ["IMG_0.jpg"], _json_images([1], ["img_0.jpg"]))


def test_missing_names_are_matched_by_id_with_a_warning_or_refused_by_file_name():
    # Records without image/filename (the format allows it) and a JSON image without file_name.
    json_images = _json_images([1, 2, 3], NAMES)
    del json_images[2]["file_name"]
    match = match_images([1, 2, 3], ["", "img_1.jpg", "img_2.jpg"], json_images)
    assert match.json_id_of == {1: 1, 2: 2, 3: 3}
    assert match.notes == (("WARNING: 1 records have no stored file name and 1 of their JSON images have no "
                            "file_name: those images are matched by id only, their file names unchecked"),)
    # The named pair is still checked.
    with pytest.raises(ValueError, match="1 of 3 records"):
        match_images([1, 2, 3], ["", "zzz.jpg", "img_2.jpg"], json_images)
    with pytest.raises(ValueError, match=r"record image id 1 has no stored file name .* cannot be matched by file "
                                         r"name \(2 of 3 records cannot be matched by file name\)"):
        match_images([1, 2, 3], ["", "img_1.jpg", "img_2.jpg"], json_images, FILE_NAME)


def test_repeated_ids_and_ambiguous_names_are_errors():
    with pytest.raises(ValueError, match=r"the records hold image id 1 2 times \('a.jpg', 'b.jpg'\); 1 id\(s\) repeat"):
        match_images([1, 1, 2], ["a.jpg", "b.jpg", "c.jpg"], _json_images([1, 2], ["a.jpg", "c.jpg"]))
    # One basename in two JSON folders: the record's full name decides, else it is ambiguous.
    json_images = _json_images([7, 8], ["left/x.jpg", "right/x.jpg"])
    assert match_images([1], ["right/x.jpg"], json_images, FILE_NAME).json_id_of == {1: 8}
    with pytest.raises(ValueError, match="the JSON has 2 images of that name: 'left/x.jpg' \\(id 7\\)"):
        match_images([1], ["x.jpg"], json_images, FILE_NAME)
    # Two records of one file name cannot both be one JSON image.
    with pytest.raises(ValueError, match="records 1 and 2 are both 'x.jpg', the JSON's image 5"):
        match_images([1, 2], ["a/x.jpg", "b/x.jpg"], _json_images([5], ["x.jpg"]), FILE_NAME)
    with pytest.raises(ValueError, match="match_by must be one of id_and_file_name, file_name"):
        match_images([1], ["a.jpg"], _json_images([1], ["a.jpg"]), "id")
