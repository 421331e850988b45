"""Sample-prompt files (ldm.pipelines.prompt_file): kohya sd-scripts' per-prompt options, plain files, the .json
and .toml forms, and a clear error naming file:line for anything the parser cannot take (a file is bounded data)."""

import json

import pytest

import ldm.pipelines.prompt_file as prompt_file
from ldm.pipelines.prompt_file import (
    PromptFileError,
    SamplePrompt,
    check_sizes,
    read_prompt_file,
    sampler_for,
    settings_label,
)
from ldm.pipelines.sampling_options import SamplingOptions

KOHYA = """\
# prompt 1
masterpiece, a girl in white shirts --n low quality, worst quality --w 768 --h 512 --d 1 --l 7.5 --s 28

# prompt 2: options in any order and case, a negative prompt up to the next option
a boy in a suit --S 40 --N (bad hands), blurry  photo --W 576 --H 832 --SS euler_a --L 5 --D 2
   # an indented comment
a plain prompt, no options
"""


def write(tmp_path, text, name="prompts.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_every_option_of_kohya_lines(tmp_path):
    path = write(tmp_path, KOHYA)
    first, second, plain = read_prompt_file(path)
    assert first == SamplePrompt("masterpiece, a girl in white shirts", negative_prompt="low quality, worst quality",
                                 width=768, height=512, seed=1, guidance_scale=7.5, steps=28, where=f"{path}:2")
    assert second == SamplePrompt("a boy in a suit", negative_prompt="(bad hands), blurry  photo", width=576,
                                  height=832, seed=2, guidance_scale=5.0, steps=40, sampler="euler_ancestral",
                                  where=f"{path}:5")
    assert plain == SamplePrompt("a plain prompt, no options", where=f"{path}:7") and not plain.has_settings()
    assert first.has_settings()


def test_a_plain_file_is_one_prompt_a_line(tmp_path):
    prompts = read_prompt_file(write(tmp_path, "a red circle\n\n  a blue square  \r\n"))
    assert [p.prompt for p in prompts] == ["a red circle", "a blue square"]
    assert not any(p.has_settings() for p in prompts)


@pytest.mark.parametrize("name, ours", [("ddim", "ddim"), ("ddpm", "ddpm"), ("euler", "euler"), ("k_euler", "euler"),
                                        ("euler_a", "euler_ancestral"), ("K_EULER_A", "euler_ancestral"),
                                        ("dpmsolver++", "dpmpp_2m"), ("dpmpp_2m", "dpmpp_2m"),
                                        ("euler_ancestral", "euler_ancestral")])
def test_kohya_sampler_names_map_to_ours(tmp_path, name, ours):
    (prompt,) = read_prompt_file(write(tmp_path, f"a cat --ss {name}\n"))
    assert prompt.sampler == ours


@pytest.mark.parametrize("line, match", [
    ("a cat --ss heun", r"prompts.txt:2: --ss 'heun': kohya's sampler 'heun' is not available here"),
    ("a cat --ss k_dpm_2_a", r"prompts.txt:2: --ss 'k_dpm_2_a': kohya's sampler .* not available"),
    ("a cat --ss dpmsolver", r"prompts.txt:2: --ss 'dpmsolver': kohya's sampler .* not available"),
    ("a cat --ss magic", r"prompts.txt:2: --ss 'magic': unknown sampler"),
    ("a cat --cn pose.png", r"prompts.txt:2: kohya's --cn \(ControlNet image\) is not supported"),
    ("a cat --am 0.5,1", r"prompts.txt:2: kohya's --am \(network \(LoRA\) multipliers\) is not supported"),
    ("a cat --g 3.5", r"prompts.txt:2: kohya's --g \(embedded guidance scale \(FLUX\)\) is not supported"),
    ("a cat --zz 1", r"prompts.txt:2: unknown option --zz; the options are --n --w --h --d --l --s --ss"),
    ("a cat -- sitting", r"prompts.txt:2: unknown option --sitting"),
    ("a cat --w 512px", r"prompts.txt:2: --w '512px': must be a whole number from 1 to 4096"),
    ("a cat --h 4097", r"prompts.txt:2: --h '4097': must be a whole number from 1 to 4096"),
    ("a cat --w 0", r"prompts.txt:2: --w '0': must be a whole number from 1 to 4096"),
    ("a cat --s 1001", r"prompts.txt:2: --s '1001': must be a whole number from 1 to 1000"),
    ("a cat --s 0", r"prompts.txt:2: --s '0': must be a whole number from 1 to 1000"),
    ("a cat --d -1", r"prompts.txt:2: --d '-1': must be a whole number from 0 to"),
    ("a cat --d 99999999999999999999", r"prompts.txt:2: --d '99999999999999999999': must be a whole number"),
    ("a cat --l seven", r"prompts.txt:2: --l 'seven': must be a number >= 0"),
    ("a cat --l inf", r"prompts.txt:2: --l 'inf': must be a number >= 0"),
    ("a cat --l -1", r"prompts.txt:2: --l '-1': must be a number >= 0"),
    ("a cat --n", r"prompts.txt:2: --n '': needs a value"),
    ("a cat --w", r"prompts.txt:2: --w '': must be a whole number"),
    ("a cat --w 64 --W 128", r"prompts.txt:2: --w is given twice"),
    ("--w 512 --h 512", r"prompts.txt:2: no prompt before the options"),
])
def test_a_bad_line_is_refused_naming_file_and_line(tmp_path, line, match):
    with pytest.raises(PromptFileError, match=match):
        read_prompt_file(write(tmp_path, f"# a comment\n{line}\nanother prompt\n"))


def test_too_many_prompts(tmp_path):
    path = write(tmp_path, "# header\n" + "a prompt\n" * 1001)  # 9 KB
    with pytest.raises(PromptFileError, match=r"prompts.txt:1002: more than 1000 prompts"):
        read_prompt_file(path)
    assert len(read_prompt_file(write(tmp_path, "a prompt\n" * 1000, "ok.txt"))) == 1000


def test_too_big_a_file(tmp_path, monkeypatch):
    monkeypatch.setattr(prompt_file, "MAX_BYTES", 1000)
    with pytest.raises(PromptFileError, match=r"big.txt: 1001 bytes; a prompt file is at most 1000 bytes"):
        read_prompt_file(write(tmp_path, "a" * 1000 + "\n", "big.txt"))


@pytest.mark.parametrize("content, match", [
    (b"", r"empty.txt has no prompts"),
    (b"# only a comment\n\n", r"empty.txt has no prompts"),
    (b"a cat \xff\xfe\n", r"empty.txt: not UTF-8 text \(byte 6\)"),
])
def test_empty_and_undecodable_files(tmp_path, content, match):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(PromptFileError, match=match):
        read_prompt_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(PromptFileError, match=r"nothing.txt: no such file"):
        read_prompt_file(tmp_path / "nothing.txt")
    with pytest.raises(PromptFileError, match=r"no such file"):
        read_prompt_file(tmp_path)  # a folder


def test_kohya_json_form(tmp_path):
    entries = ["a red circle --w 64 --ss euler_a",
               {"prompt": "a blue square", "negative_prompt": "blurry", "width": 32, "height": 48, "seed": 3,
                "scale": 4.5, "sample_steps": 12, "sample_sampler": "k_euler", "enum": 1}]
    path = write(tmp_path, json.dumps(entries), "prompts.json")
    first, second = read_prompt_file(path)
    assert first == SamplePrompt("a red circle", width=64, sampler="euler_ancestral", where=f"{path}: entry 1")
    assert second == SamplePrompt("a blue square", negative_prompt="blurry", width=32, height=48, seed=3,
                                  guidance_scale=4.5, steps=12, sampler="euler", where=f"{path}: entry 2")


def test_kohya_toml_form(tmp_path):
    path = write(tmp_path, '[prompt]\nwidth = 64\nheight = 32\nscale = 5\nsample_steps = 20\n\n'
                           '[[prompt.subset]]\nprompt = "a red circle"\n\n'
                           '[[prompt.subset]]\nprompt = "a blue square"\nwidth = 48\nseed = 7\n', "prompts.toml")
    first, second = read_prompt_file(path)
    assert first == SamplePrompt("a red circle", width=64, height=32, guidance_scale=5.0, steps=20,
                                 where=f"{path}: [[prompt.subset]] 1")
    assert (second.width, second.height, second.seed, second.steps) == (48, 32, 7, 20)


@pytest.mark.parametrize("name, text, match", [
    ("p.json", '{"prompt": "a"}', r"p.json: a .json prompt file is a list"),
    ("p.json", '["a", 3]', r"p.json: entry 2: an entry must be a prompt line or a table"),
    ("p.json", '[{"prompt": "a", "controlnet_image": "x.png"}]', r"p.json: entry 1: key\(s\) \['controlnet_image'\] "
                                                                 r"not supported"),
    ("p.json", '[{"prompt": "a", "width": true}]', r"p.json: entry 1: width must be a string or a number"),
    ("p.json", '[{"prompt": "a", "width": 64.5}]', r"p.json: entry 1: width '64.5': must be a whole number"),
    ("p.json", '[{"negative_prompt": "b"}]', r"p.json: entry 1: 'prompt' must be a non-empty string"),
    ("p.json", '[{"prompt": "a"', r"p.json: not valid JSON"),
    ("p.json", "[" * 5000 + "]" * 5000, r"p.json: not valid JSON \(RecursionError"),  # a nesting bomb
    ("p.toml", 'prompt = "a"', r"p.toml: a .toml prompt file is a \[prompt\] table"),
    ("p.toml", '[prompt]\n[[prompt.subset]]\nprompt = "a"\nsample_sampler = "heun"\n',
     r"p.toml: \[\[prompt.subset\]\] 1: sample_sampler 'heun': kohya's sampler"),
    ("p.toml", "x = " + "[" * 5000 + "]" * 5000, r"p.toml: not valid TOML \(RecursionError"),
])
def test_bad_json_and_toml(tmp_path, name, text, match):
    with pytest.raises(PromptFileError, match=match):
        read_prompt_file(write(tmp_path, text, name))


def test_json_list_length_is_bounded(tmp_path):
    with pytest.raises(PromptFileError, match=r"p.json: 1001 prompts; a prompt file holds at most 1000"):
        read_prompt_file(write(tmp_path, json.dumps(["a"] * 1001), "p.json"))


def test_sizes_must_fit_the_model():
    ok = SamplePrompt("a", width=64, height=32, where="p.txt:1")
    check_sizes([ok], 8)
    with pytest.raises(PromptFileError, match=r"p.txt:3: --h 36 is not a multiple of 8, which this model needs "
                                              r"\(e.g. 32 or 40\)"):
        check_sizes([ok, SamplePrompt("b", width=64, height=36, where="p.txt:3")], 8)


def test_sampler_for_keeps_what_applies():
    base = SamplingOptions(name="dpmpp_2m", steps=25, karras=True, spacing="trailing")
    assert sampler_for(SamplePrompt("a"), base) == base
    assert sampler_for(SamplePrompt("a", steps=7), base) == SamplingOptions(name="dpmpp_2m", steps=7, karras=True,
                                                                            spacing="trailing")
    assert sampler_for(SamplePrompt("a", sampler="euler_ancestral"), base) == SamplingOptions(
        name="euler_ancestral", steps=25, karras=True, spacing="trailing")
    assert sampler_for(SamplePrompt("a", sampler="ddim", steps=3), base) == SamplingOptions(
        name="ddim", steps=3, karras=False, spacing="trailing")
    ddim = SamplingOptions(name="ddim", steps=50, eta=0.5, steps_offset=1, final_alpha_one=False)
    assert sampler_for(SamplePrompt("a", sampler="euler"), ddim) == SamplingOptions(name="euler", steps=50,
                                                                                    steps_offset=1)


def test_settings_label():
    assert settings_label(512, 768, 30, 7.0, 42, "euler_ancestral") == "512x768 s30 g7 seed42 euler_ancestral"
    assert settings_label(16, 8, 3, 2.5, 0, "ddim") == "16x8 s3 g2.5 seed0 ddim"
