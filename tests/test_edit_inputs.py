"""Edits built from inputs beyond the two-prompt examples: several targets that each change their own word,
prompts at and over the model's text length, and settings outside what they mean — each either works as
P2P_SPEC §3–§5 says or raises an error that names the bad value (P2P_SPEC §9.2, ../shared/STYLE.md).

Controllers are built without a model (`build_edit`, `build_blend`), so these tests take milliseconds.
"""

import pytest
import torch

from p2p.edit import BlendSpec, EditSpec, build_blend, build_edit
from p2p.schedules import cross_alphas
from p2p.tokens import CONTEXT_LENGTH as TEXT

STEPS = 4
LATENT = (8, 8)
THREE = ["a cat riding a bicycle", "a dog riding a bicycle", "a cat riding a horse"]  # each target swaps one word


def _edit(spec, prompts=THREE, *, context_length=TEXT):
    return build_edit(spec, prompts, num_steps=STEPS, latent_hw=LATENT, context_length=context_length)


# --- several targets, each with its own word ------------------------------------------------------------


def test_a_per_word_window_acts_in_the_targets_that_have_the_word():
    # the reference skips targets without the word; 'dog' is only in target 0, 'horse' only in target 1
    alphas = _edit(EditSpec(cross_replace_steps={"default_": 0.5, "dog": 1.0, "horse": 0.25})).cross_alphas
    dog, horse = 2, 5  # SOT a dog … / SOT a cat riding a horse
    assert alphas[:, 0, dog].tolist() == [1, 1, 1, 1] and alphas[:, 1, dog].tolist() == [1, 1, 0, 0]
    assert alphas[:, 1, horse].tolist() == [1, 0, 0, 0] and alphas[:, 0, horse].tolist() == [1, 1, 0, 0]


def test_a_per_word_window_for_a_word_in_no_target_raises_naming_it():
    with pytest.raises(ValueError, match="'fox' of cross_replace_steps is not in any target prompt"):
        _edit(EditSpec(cross_replace_steps={"default_": 0.5, "fox": 1.0}))
    with pytest.raises(ValueError, match="'fox'"):  # object preservation names its words the same way
        _edit(EditSpec(preserve=["fox"]))


def test_reweight_may_leave_a_target_without_the_word_at_scale_one():
    scales = _edit(EditSpec(kind="replace", reweight={"dog": [3.0, 1.0], "horse": [1, -2.0]})).reweight
    expected = torch.ones(2, TEXT)
    expected[0, 2], expected[1, 5] = 3.0, -2.0
    assert torch.equal(scales, expected)


def test_reweight_of_a_word_missing_from_a_target_it_scales_raises_naming_both():
    with pytest.raises(ValueError, match="word 'dog' is not in prompt 'a cat riding a horse'"):
        _edit(EditSpec(kind="replace", reweight={"dog": 2.0}))
    with pytest.raises(ValueError, match="reweight for 'dog' must be a number"):
        _edit(EditSpec(kind="replace", reweight={"dog": ["x", 1.0]}))


def test_reweight_alone_without_words_raises_instead_of_doing_nothing():
    with pytest.raises(ValueError, match="needs the words to scale"):
        _edit(EditSpec(kind="reweight"), ["a cat", "a cat"])


# --- prompts and the model's text length ---------------------------------------------------------------

LONG = "a " + " ".join(["red"] * 19)  # 20 tokens: fits CLIP's 77, not a 16-position model


@pytest.mark.parametrize(
    "build",
    [
        lambda: cross_alphas({"red": 0.5}, targets=[LONG], num_steps=STEPS, context_length=16),
        lambda: build_blend(
            BlendSpec(words=["red"]),
            [LONG, LONG],
            num_steps=STEPS,
            latent_hw=LATENT,
            downsamplings=0,
            context_length=16,
        ),
        lambda: _edit(EditSpec(kind="reweight", reweight={"red": 2.0}), [LONG, LONG], context_length=16),
    ],
    ids=["window", "blend", "reweight"],
)
def test_a_prompt_over_the_models_text_length_raises_naming_it(build):
    # word positions were looked up against CLIP's 77 and indexed past the model's 16 (IndexError)
    with pytest.raises(ValueError, match=r"'a red red .*' has 20 tokens, but at most 14 fit \(16"):
        build()


def test_prompts_must_be_a_list_of_strings():
    with pytest.raises(TypeError, match="list of strings"):
        _edit(EditSpec(), "a cat riding a bicycle")
    with pytest.raises(TypeError, match="must be a string, got 2"):
        _edit(EditSpec(), ["a cat", 2])


# --- settings outside their range ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,message",
    [
        (EditSpec(self_replace_steps=1.5), "self_replace_steps: window 1.5 must satisfy 0 ≤ start ≤ end ≤ 1"),
        (EditSpec(self_replace_steps=(0.6, 0.2)), "self_replace_steps: window"),
        (EditSpec(self_replace_steps=True), "self_replace_steps: window True must be a fraction"),
        (EditSpec(cross_replace_steps=-0.1), "cross_replace_steps: window -0.1"),
        (EditSpec(cross_replace_steps=(0.2, 0.5, 0.9)), "cross_replace_steps: window"),
        (EditSpec(cross_replace_steps={"default_": 0.8, "dog": (0, 1.2)}), r"cross_replace_steps\['dog'\]: window"),
        (EditSpec(self_max_side=-8), "self_max_side=-8 must be a positive int"),
        (EditSpec(self_max_side=0), "self_max_side=0 must be a positive int"),
        (EditSpec(self_max_fraction=0), "resolution fraction 0 must be in"),
    ],
    ids=["self>1", "self reversed", "self bool", "cross<0", "cross triple", "word>1", "side<0", "side 0", "fraction 0"],
)
def test_out_of_range_settings_raise_naming_the_setting(spec, message):
    with pytest.raises(ValueError, match=message):
        _edit(spec)


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(threshold=1.0), "threshold 1.0 must be in"),
        (dict(threshold=-0.1), "threshold -0.1 must be in"),
        (dict(subtract_words=["riding"], subtract_threshold=1.5), "subtract_threshold 1.5 must be in"),
        (dict(dilation=-1), "dilation -1 must be an int"),
        (dict(start=1.2), "blend start: window 1.2"),
    ],
)
def test_out_of_range_blend_settings_raise_naming_the_setting(changes, message):
    with pytest.raises(ValueError, match=message):
        build_blend(BlendSpec(words=["riding"], **changes), THREE, num_steps=STEPS, latent_hw=LATENT, downsamplings=0)


def test_blend_threshold_zero_is_allowed_and_keeps_every_attended_pixel():
    blend = build_blend(
        BlendSpec(words=["riding"], threshold=0.0), THREE, num_steps=STEPS, latent_hw=LATENT, downsamplings=0
    )
    blend.summed = torch.rand(3, TEXT, *LATENT) + 0.01  # every pixel attends a little
    assert bool(blend.mask()[1:].all())


# --- scripts/edit.py: the config as Hydra composes it, checked before the model is loaded ---------------


def _compose(*overrides):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return compose(config_name="edit", overrides=list(overrides))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["prompts=a red circle"], "prompts must be a list of strings"),  # was split into 12 one-letter prompts
        (["prompts=[1,2]"], "prompts must be a list of strings"),
        (['prompts=["a red circle"]'], "needs a source and at least one target prompt"),
        (["edit.kind=swap"], "edit.kind='swap' is not supported"),
        (["blend=local"], "LocalBlend needs its words"),  # was: no blend at all, silently
    ],
)
def test_edit_script_refuses_bad_inputs_before_loading_the_model(overrides, message):
    from scripts._common import edit_inputs

    with pytest.raises(ValueError, match=message):
        edit_inputs(_compose(*overrides))


def test_edit_script_inputs_for_every_edit_kind_and_blend():
    from scripts._common import edit_inputs

    prompts, spec, blend = edit_inputs(_compose('prompts=["a red circle"]', "edit=store"))
    assert prompts == ["a red circle"] and spec.kind == "none" and blend is None
    for kind in ("replace", "refine", "reweight"):
        _, spec, _ = edit_inputs(_compose(f"edit={kind}", "edit.self_replace_steps=[0.1,0.5]"))
        assert spec.kind == kind and list(spec.self_replace_steps) == [0.1, 0.5]
    _, _, blend = edit_inputs(_compose("blend=local", "blend.words=[[red],[blue]]", "blend.threshold=0.5"))
    assert blend.words == [["red"], ["blue"]] and blend.threshold == 0.5


def test_edit_script_refuses_a_run_folder_that_holds_an_earlier_run(tmp_path):
    from scripts._common import check_fresh

    assert check_fresh(tmp_path) == tmp_path  # Hydra's own .hydra/ and log are there before main runs
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        check_fresh(tmp_path)


def test_kind_none_injects_nothing_into_a_different_prompt_and_refuses_a_fader():
    # 'none' copied the source's columns token by token into any target, whatever its words
    with pytest.raises(ValueError, match="needs targets equal to the source"):
        _edit(EditSpec(kind="none"), ["a cat riding a bicycle", "a dog on a mat"])
    assert _edit(EditSpec(kind="none", cross_replace_steps=1.0), ["a cat", "a cat"]).kind == "none"


def test_edit_with_kind_none_refuses_settings_it_would_ignore():
    from types import SimpleNamespace

    from p2p.edit import build_controllers

    model = SimpleNamespace(context_length=TEXT)  # refused before the model is used
    with pytest.raises(ValueError, match="edit kind 'none' edits nothing"):  # edit() builds through this
        build_controllers(
            model,
            ["a cat", "a cat"],
            spec=EditSpec(kind="none", reweight={"cat": 2.0}),
            blend=None,
            store=None,
            num_steps=2,
            latent_hw=(8, 8),
        )


# --- stored maps, as the views read them ----------------------------------------------------------------


def test_stored_maps_are_distributions_over_the_keys_and_views_over_the_tokens():
    import dataclasses

    from models.stable_diffusion import StableDiffusion, preset
    from p2p import views
    from p2p.edit import StoreSpec, edit
    from p2p.pipeline import SamplerSettings

    torch.manual_seed(0)
    config = preset("tiny")
    config.unet = dataclasses.replace(config.unet, attention_kinds=("cross", "cross", "cross"))  # SD's layer kinds
    model = StableDiffusion(config).eval()
    prompts = ["a cat eating pizza", "a cat eating lasagne", "a dog eating pizza"]
    result = edit(
        model,
        prompts,
        seed=0,
        settings=SamplerSettings(steps=2, guidance=5.0),
        progress=False,
        spec=EditSpec(kind="replace", cross_replace_steps=1.0, reweight={"eating": [3.0, 1.0]}),
        store=StoreSpec(kinds=("cross", "self"), max_fraction=1.0, per_step=True),
    )
    assert {site.kind for site in result.store.sites.values()} == {"cross", "self"}
    for name in result.store.maps:  # recorded before the edit (the fader would break the sum)
        torch.testing.assert_close(
            result.store.average(name).sum(dim=-1), torch.ones(3, *result.store.maps[name].shape[1:2])
        )
    for prompt_index, prompt in enumerate(prompts):
        for step in (None, 1):
            per_token = views.token_maps(result.store, prompt_index, step=step)
            assert per_token.shape == (TEXT, 8, 8)
            torch.testing.assert_close(per_token.sum(dim=0), torch.ones(8, 8))
        assert (
            len(views.cross_attention_tiles(result.store, prompt, prompt_index)) == len(views.decode_tokens(prompt)) + 2
        )


def test_a_flat_blend_word_list_missing_from_a_prompt_points_to_per_prompt_lists():
    # the reference's LocalBlend(prompts, ("cat", "dog")) is one word per prompt; ours is one list for every prompt
    with pytest.raises(
        ValueError, match=r"blend.words: word 'cat' is not in prompt 'a dog riding a bicycle'.*\[\['cat'\], \['dog'\]\]"
    ):
        build_blend(BlendSpec(words=["cat", "dog"]), THREE[:2], num_steps=STEPS, latent_hw=LATENT, downsamplings=0)
    blend = build_blend(
        BlendSpec(words=[["cat"], ["dog"]]), THREE[:2], num_steps=STEPS, latent_hw=LATENT, downsamplings=0
    )
    assert blend.weights[:, 2].tolist() == [1.0, 1.0]  # 'cat' in the source, 'dog' in the target: position 2


def test_a_blend_built_for_another_text_length_is_refused_by_name():
    from models.attention import AttentionSite

    blend = build_blend(
        BlendSpec(words=["cat"]), ["a cat", "a cat"], num_steps=STEPS, latent_hw=LATENT, downsamplings=0
    )  # 77 positions, the SD default
    site = AttentionSite("input_blocks.1.1.transformer_blocks.0.attn2", "cross", LATENT, 16)
    blend.begin_step(0)
    with pytest.raises(ValueError, match="attends to 16 text tokens but the blend was built for 77"):
        blend(torch.rand(4, 2, 64, 16).softmax(dim=-1), site)


def test_reweight_alone_accepts_prompts_that_differ_only_in_case():
    # CLIP lowercases: "A red circle" and "a red circle" are the same tokens, so token-by-token maps line up
    from p2p.edit import build_edit

    controller = build_edit(
        EditSpec(kind="reweight", reweight={"red": 2.0}),
        ["A red circle", "a red circle"],
        num_steps=2,
        latent_hw=(8, 8),
        context_length=TEXT,
    )
    assert controller is not None
    with pytest.raises(ValueError, match="needs targets equal to the source"):
        build_edit(
            EditSpec(kind="reweight", reweight={"red": 2.0}),
            ["a red circle", "a red square"],
            num_steps=2,
            latent_hw=(8, 8),
            context_length=TEXT,
        )
