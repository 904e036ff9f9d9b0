"""Settings: typed fields read from the environment, checked however they are made."""
import pytest

from backend.config import Settings, SettingsError, demo_from_env, env_fields


def test_each_setting_is_read_as_its_type():
    settings = Settings.from_env({"TORCH_THREADS": "3", "PROPOSAL_THRESHOLD": "0.55", "CROP_SQUARE": "yes",
                                  "CLIP_MODEL": "owner/name", "OFFLINE": "off"})
    assert (settings.torch_threads, settings.proposal_threshold, settings.crop_square) == (3, 0.55, True)
    assert (settings.clip_model, settings.offline) == ("owner/name", False)
    assert Settings.from_env({}) == Settings()                     # unset and empty mean the default
    assert Settings.from_env({"TORCH_THREADS": "  "}).torch_threads == 0


@pytest.mark.parametrize("name, raw", [("TORCH_THREADS", "two"), ("PROPOSAL_THRESHOLD", "high"),
                                       ("CROP_SQUARE", "maybe"), ("OFFLINE", "2")])
def test_a_value_that_is_not_its_type_names_the_setting(name, raw):
    with pytest.raises(SettingsError, match=f"{name}='{raw}' is not a valid"):
        Settings.from_env({name: raw})


def test_values_set_in_code_are_checked_too():
    settings = Settings()
    assert settings.replace(proposal_threshold=1).proposal_threshold == 1       # an int is a valid float
    for wrong in ({"torch_threads": "3"}, {"torch_threads": True}, {"crop_square": 1}, {"clip_model": None}):
        with pytest.raises(SettingsError, match="is not a valid"):
            settings.replace(**wrong)
    with pytest.raises(SettingsError, match="PROFILE"):
        settings.replace(profile="fast")
    with pytest.raises(AttributeError):                                     # frozen: composition roots share it
        settings.torch_threads = 2


def test_the_cpu_profile_picks_its_detector_unless_one_is_named():
    assert Settings.from_env({"PROFILE": "cpu"}).detector == "ssdlite320_mobilenet_v3_large"
    assert Settings.from_env({"PROFILE": "cpu", "DETECTOR": "tiny_shapes"}).detector == "tiny_shapes"


def test_the_hub_offline_switch_means_offline():
    assert Settings.from_env({"HF_HUB_OFFLINE": "1"}).offline
    assert not Settings.from_env({"HF_HUB_OFFLINE": "anything else"}).offline   # the hub's own reading


def test_every_setting_has_help_and_demo_is_not_an_environment_setting():
    names = [f.name for f in env_fields()]
    assert "demo" not in names and len(names) == len(set(names))
    assert all(f.metadata["help"] for f in env_fields())
    assert demo_from_env({"DEMO": "true"}) and not demo_from_env({})
    with pytest.raises(SettingsError, match="DEMO"):
        demo_from_env({"DEMO": "perhaps"})


def test_a_label_config_is_parsed_once_with_the_prompt_defaults():
    xml = ('<View><Image name="image" value="$image"/>'
           '<RectangleLabels name="label" toName="image"><Label value="star"/></RectangleLabels></View>')
    settings = Settings.from_env({"PROMPT_TEMPLATE": "a drawing of a {}."})
    config = settings.project_config(xml)
    assert settings.project_config(xml) is config                      # every request asks: parsed once
    assert Settings().project_config(xml) != config                    # other defaults, other prompts
    assert config.labelsets["label"].prompts == (("a drawing of a star.",),)


def test_the_learning_harm_setting_reaches_the_learner_and_its_version():
    from backend import wiring

    assert wiring.adapter_settings(Settings.from_env({"LEARNING_HARM": "0"})).harm == 0.0
    from backend.labeling.adapter import AdapterSettings

    assert wiring.adapter_settings(Settings()) == AdapterSettings()   # the setting's default is the learner's
    methods = {wiring.adapter_settings(Settings.from_env({"LEARNING_HARM": v})).method for v in ("0", "1")}
    assert len(methods) == 2                       # another trade-off is another model version
    with pytest.raises(SettingsError, match="LEARNING_HARM"):
        Settings.from_env({"LEARNING_HARM": "-1"})
    assert wiring.adapter_settings(Settings.from_env({"LEARNING_REPEATS": "4"})).repeats == 4
    assert wiring.adapter_settings(Settings.from_env({"LEARNING_REPEATS": "4"})).method != AdapterSettings().method
    for wrong in ("0", "17"):
        with pytest.raises(SettingsError, match="LEARNING_REPEATS"):
            Settings.from_env({"LEARNING_REPEATS": wrong})


def test_crop_mirror_reaches_the_crops_with_or_without_demo_and_only_then_changes_the_fingerprint():
    from backend.labeling.specs import CropSettings, ModelSpec
    from backend.learning import embedding_space

    for demo in (False, True):
        settings = Settings.from_env({"CROP_MIRROR": "true"}).replace(demo=demo)
        assert settings.model_spec().crops.mirror
        assert not settings.replace(crop_mirror=False).model_spec().crops.mirror
    assert Settings.from_env({"CROP_MIRROR": "true"}).replace(demo=True).model_spec().crops.square   # tiny recipe kept
    spec = ModelSpec(clip_model="openai/clip-vit-base-patch32", detector="fasterrcnn_resnet50_fpn_v2",
                     crops=CropSettings(1.25, True, 16), precision="fp32", runtime="torch", device="cpu")
    assert spec.fingerprint == "df9d8774f539"       # as before CROP_MIRROR existed: learned memory keeps its key
    mirrored = ModelSpec(**{**spec.__dict__, "crops": CropSettings(1.25, True, 16, mirror=True)})
    assert mirrored.fingerprint != spec.fingerprint          # another model version: tasks are predicted again
    assert embedding_space(mirrored) == embedding_space(spec)   # the same memory: examples are stored alike
