import pytest

from hfkd.layer_map import parse_layer_map_spec, resolve_layer_map


@pytest.mark.parametrize(
    "text,expected",
    [("uniform", "uniform"), ("LAST", "last"), ("0,2,4,6", [0, 2, 4, 6]), ("[0, 3]", [0, 3]), ([1, 2], [1, 2])],
)
def test_parse(text, expected):
    assert parse_layer_map_spec(text, "hidden_layer_map") == expected


@pytest.mark.parametrize("bad", ["every-other", "1,a", "", "-1,2", [True], 3.5])
def test_parse_rejects_and_names_the_field(bad):
    with pytest.raises(ValueError, match="hidden_layer_map"):
        parse_layer_map_spec(bad, "hidden_layer_map")


def test_uniform_hidden_map_keeps_embeddings_and_last():
    # 3-layer student (4 entries) onto a 6-layer teacher (7 entries).
    assert resolve_layer_map("uniform", 4, 7, field_name="f", has_embeddings=True) == [(0, 0), (1, 2), (2, 4), (3, 6)]
    # Same depth maps one to one.
    assert resolve_layer_map("uniform", 5, 5, field_name="f", has_embeddings=True) == [(i, i) for i in range(5)]


def test_uniform_attention_map_ends_on_last_layer():
    assert resolve_layer_map("uniform", 3, 6, field_name="f", has_embeddings=False) == [(0, 1), (1, 3), (2, 5)]
    assert resolve_layer_map("uniform", 2, 12, field_name="f", has_embeddings=False) == [(0, 5), (1, 11)]


def test_last():
    assert resolve_layer_map("last", 4, 7, field_name="f", has_embeddings=True) == [(3, 6)]


def test_explicit_map_and_its_errors():
    assert resolve_layer_map([0, 2, 4, 6], 4, 7, field_name="f", has_embeddings=True) == [
        (0, 0),
        (1, 2),
        (2, 4),
        (3, 6),
    ]
    with pytest.raises(ValueError, match=r"hidden_layer_map has 3 entries but the student has 4.*'0,2,4,6'"):
        resolve_layer_map([0, 2, 4], 4, 7, field_name="hidden_layer_map", has_embeddings=True)
    with pytest.raises(ValueError, match=r"attention_layer_map refers to teacher index 6.*0\.\.5"):
        resolve_layer_map([1, 6], 2, 6, field_name="attention_layer_map", has_embeddings=False)
