"""Labeling config parsing: usable controls, their label sets and prompts, and honest problem reports."""
from __future__ import annotations

from dataclasses import replace
from xml.sax.saxutils import quoteattr

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.labeling.prompts import DEFAULT_BACKGROUND, LabelSet
from backend.studio.label_config import LabelConfigError, TaskDataError, parse_label_config

EXAMPLE = """
<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image" model_score_threshold="0.4"
                   model_background="mostly background; an empty scene"
                   model_prompt_template="a photo of a {}.; a close-up photo of a {}.">
    <Label value="Bee" predicted_values="bee,honeybee" background="yellow"/>
    <Label value="traffic_light"/>
    <Label value="Wasp" model_prompt="a photo of a wasp in flight.;a wasp"/>
  </RectangleLabels>
  <Choices name="scene" toName="image">
    <Choice value="Indoor"/><Choice value="Outdoor"/>
  </Choices>
  <Choices name="tags" toName="image" choice="multiple">
    <Choice value="Flowers"/><Choice value="Sky"/>
  </Choices>
</View>"""


def config_with(controls: str, image: str = '<Image name="image" value="$image"/>') -> str:
    return f"<View>{image}{controls}</View>"


def boxes(labels: str = '<Label value="Bee"/>', attributes: str = "", name: str = "label") -> str:
    return f'<RectangleLabels name="{name}" toName="image" {attributes}>{labels}</RectangleLabels>'


def only_control(xml: str):
    (control,) = parse_label_config(xml).controls
    return control


def test_the_example_config_yields_one_control_per_usable_tag():
    config = parse_label_config(EXAMPLE)
    assert [(c.name, c.to_name, c.type, c.value_key) for c in config.controls] == [
        ("label", "image", "rectanglelabels", "image"),
        ("scene", "image", "choices", "image"),
        ("tags", "image", "choices", "image")]
    assert config.problems == ()
    assert config.labelsets == {c.name: c.labelset for c in config.controls}


def test_rectangle_labels_become_a_regions_label_set_with_the_configured_prompts():
    labelset = parse_label_config(EXAMPLE).controls[0].labelset
    assert labelset == LabelSet(
        labels=("Bee", "traffic_light", "Wasp"),
        prompts=(("a photo of a bee.", "a close-up photo of a bee.",
                  "a photo of a honeybee.", "a close-up photo of a honeybee."),
                 ("a photo of a traffic light.", "a close-up photo of a traffic light."),
                 ("a photo of a wasp in flight.", "a wasp")),
        background=("mostly background", "an empty scene"), threshold=0.4, kind="regions")


def test_choices_become_choices_label_sets_single_or_multiple():
    _, scene, tags = parse_label_config(EXAMPLE).controls
    assert scene.labelset == LabelSet(("Indoor", "Outdoor"), (("a photo of a Indoor.",), ("a photo of a Outdoor.",)),
                                      kind="choices", multi_label=False)
    assert tags.labelset.kind == "choices" and tags.labelset.multi_label


def test_defaults():
    labelset = only_control(config_with(boxes())).labelset
    assert (labelset.prompts, labelset.background, labelset.threshold) == ((("a photo of a Bee.",),),
                                                                           DEFAULT_BACKGROUND, 0.0)


def test_an_empty_background_attribute_means_no_background_prompts():
    assert only_control(config_with(boxes(attributes='model_background=""'))).labelset.background == ()


def test_an_alias_is_the_label_name_in_results_and_the_value_feeds_the_prompts():
    labelset = only_control(config_with(boxes('<Label value="Honey bee" alias="B"/>'))).labelset
    assert labelset.labels == ("B",) and labelset.prompts == (("a photo of a Honey bee.",),)


def test_labels_are_found_inside_nested_views_and_tag_names_ignore_case():
    xml = config_with('<rectanglelabels name="label" toName="image"><View><Label value="Bee"/></View>'
                      '</rectanglelabels>', image='<View><image name="image" value="$img"/></View>')
    control = only_control(xml)
    assert control.labelset.labels == ("Bee",) and control.value_key == "img"


def test_skipped_controls_are_neither_used_nor_problems():
    config = parse_label_config(config_with(boxes() + boxes(name="other", attributes='model_skip="true"')))
    assert [c.name for c in config.controls] == ["label"] and config.problems == ()


@pytest.mark.parametrize("control, reason", [
    ('<PolygonLabels name="poly" toName="image"><Label value="Bee"/></PolygonLabels>',
     "<PolygonLabels> 'poly': unsupported control type; this backend fills only <RectangleLabels> and <Choices>"),
    ('<TextArea name="notes" toName="image"/>', "<TextArea> 'notes': unsupported control type"),
    ('<Labels name="lbl" toName="image"><Label value="Bee"/></Labels>',
     "<Labels> 'lbl': unsupported control type; draw labelled boxes with <RectangleLabels> instead"),
    ('<Rectangle name="rect" toName="image"/>', "draw labelled boxes with <RectangleLabels> instead"),
    ('<RectangleLabels name="dyn" toName="image" value="$labels"/>', "no <Label> with a value"),
    ('<Choices name="c" toName="image"><Choice value="A"/><Choice value="A"/></Choices>', "duplicate labels"),
    ('<Choices name="c" toName="text"><Choice value="A"/></Choices><Text name="text" value="$text"/>',
     "toName='text' is a <Text>, not an <Image>"),
    (boxes().replace('toName="image"', 'toName="nowhere"'), "toName='nowhere' names no tag"),
    (boxes().replace('toName="image"', 'toName="image,image2"'), "names several objects"),
    (boxes(attributes='model_score_threshold="high"'), "model_score_threshold='high' is not a number from 0 to 1"),
    (boxes(attributes='model_score_threshold="1.5"'), "is not a number from 0 to 1"),
    (boxes(attributes='model_prompt_template="a photo"'), "needs exactly one {}"),
    (boxes(attributes='model_prompt_template="a {0} photo"'), "needs exactly one {}"),
    (boxes(attributes='model_prompt_template="{} and {}"'), "needs exactly one {}"),
])
def test_unusable_controls_are_reported_with_the_reason(control, reason):
    config = parse_label_config(config_with(boxes(name="usable") + control))
    assert [c.name for c in config.controls] == ["usable"]
    assert len(config.problems) == 1 and reason in config.problems[0]


def test_controls_with_the_same_name_are_both_reported():
    config = parse_label_config(config_with(boxes(name="a") + boxes(name="dup") + boxes(name="dup")))
    assert [c.name for c in config.controls] == ["a"]
    assert len(config.problems) == 2 and all("same name" in problem for problem in config.problems)


def test_an_image_with_a_fixed_url_is_reported():
    xml = config_with(boxes(name="usable"), image='<Image name="image" value="http://x/a.png"/>')
    with pytest.raises(LabelConfigError, match="no task field as its value"):
        parse_label_config(xml)


@pytest.mark.parametrize("xml, message", [
    ("<View><Image name='image' value='$image'>", "not well-formed XML"),
    ("", "not well-formed XML"),
    (f"<View>{boxes()}</View>", "no <Image> tag"),
    (config_with('<TextArea name="notes" toName="image"/>'), "no control .* can be pre-annotated: <TextArea> 'notes'"),
    (config_with(""), "the config has no controls"),
    ('<!DOCTYPE v [<!ENTITY a "aaaa">]><View>&a;</View>', "must not contain <!DOCTYPE>"),
])
def test_unusable_configs_raise_a_clear_error(xml, message):
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(xml)


def test_the_error_is_a_value_error():
    assert issubclass(LabelConfigError, ValueError)


def test_the_fingerprint_follows_what_shapes_predictions():
    base = parse_label_config(EXAMPLE).fingerprint
    assert parse_label_config(EXAMPLE).fingerprint == base
    assert parse_label_config(EXAMPLE.replace('background="yellow"', 'hotkey="b"')).fingerprint == base
    for change in [("0.4", "0.5"), ("Wasp", "Hornet"), ("in flight", "at rest"), ('name="scene"', 'name="place"'),
                   ('choice="multiple"', ""), ("$image", "$photo"), ("an empty scene", "sky")]:
        assert parse_label_config(EXAMPLE.replace(*change)).fingerprint != base, change


def test_image_url_reads_the_task_field_of_the_image():
    control = parse_label_config(EXAMPLE).controls[0]
    assert control.image_url({"image": " /data/upload/1/a.png ", "other": 1}) == "/data/upload/1/a.png"


@pytest.mark.parametrize("data", [{}, {"image": ""}, {"image": None}, {"image": 3}, None])
def test_image_url_names_the_missing_field(data):
    control = parse_label_config(EXAMPLE).controls[0]
    with pytest.raises(TaskDataError, match=r"no image in 'image' \(the Image 'image' reads \$image\)"):
        control.image_url(data)


xml_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20)


@settings(deadline=None)    # the machine may be busy; correctness, not speed, is tested here
@given(st.lists(xml_text.filter(str.strip), min_size=1, max_size=5, unique=True))
def test_any_label_names_come_through_verbatim(names):
    labels = "".join(f"<Choice value={quoteattr(name)}/>" for name in names)
    control = only_control(config_with(f'<Choices name="c" toName="image">{labels}</Choices>'))
    assert control.labelset.labels == tuple(names)


def test_per_label_score_thresholds():
    """A <Label>'s model_score_threshold replaces its control's for that label; labels without one keep the
    control's; a config without any keeps no per-label list (its fingerprint does not change)."""
    labels = '<Label value="Bee" model_score_threshold="0.8"/><Label value="Wasp"/>'
    control = only_control(config_with(boxes(labels, 'model_score_threshold="0.3"')))
    assert control.labelset.minimums() == (0.8, 0.3)
    assert only_control(config_with(boxes(labels))).labelset.minimums() == (0.8, 0.0)
    plain = only_control(config_with(boxes('<Label value="Bee"/><Label value="Wasp"/>'))).labelset
    assert plain.thresholds == () and plain.minimums() == (0.0, 0.0)
    assert LabelSet.build(["Bee", "Wasp"]).fingerprint == "989c2a194290"   # as before thresholds existed
    assert control.labelset.fingerprint != replace(control.labelset, thresholds=()).fingerprint
    with pytest.raises(LabelConfigError, match="is not a number from 0 to 1"):
        parse_label_config(config_with(boxes('<Label value="Bee" model_score_threshold="2"/>')))
