"""Prompt wording of the ``vlm_judge`` reward: the question styles, their default dimensions and the answer cues.

Written for this suite (not copied from VideoScore2 or UnifiedReward): a style is a question with the fields
``{prompt}`` (the generation prompt) and ``{dimension}`` (one dimension's description), plus a pairwise question
over "Video A" and "Video B". The answer instruction (rating scale, Yes/No, A/B) is appended by the judge, so the
same question serves every answer mode. Fields are substituted with ``str.replace``, never ``str.format``, so braces
in a user's prompt stay as they are.
"""

from __future__ import annotations

PROMPT_FIELD, DIMENSION_FIELD = "{prompt}", "{dimension}"

# VideoScore2-style (arXiv 2509.22799): one question per dimension, each answered on a rating scale.
VIDEOSCORE2_DIMENSIONS = {
    "visual_quality": "visual quality: sharp, clean frames without artifacts, blur, distortions or flicker",
    "text_alignment": "alignment with the prompt: the subjects, attributes and actions it describes are shown",
    "physical_consistency": "physical and common-sense consistency: plausible motion, objects keep their shape, "
                            "size and identity, nothing appears or vanishes without cause",
}
VIDEOSCORE2_POINT = ("This video was produced by a text-to-video model for the prompt:\n\"{prompt}\"\n\n"
                     "Judge one aspect only, its {dimension}.")
VIDEOSCORE2_PAIR = ("Two videos, A and B, were produced by text-to-video models for the same prompt:\n\"{prompt}\"\n\n"
                    "Compare them on one aspect only, their {dimension}. Which video is better?")

# UnifiedReward-style (arXiv 2503.05236): one overall point score of the video.
UNIFIEDREWARD_DIMENSIONS = {"overall": "overall quality, weighing visual quality, motion and faithfulness to the "
                                       "prompt"}
UNIFIEDREWARD_POINT = ("You are grading a generated video. The prompt given to the video model was:\n\"{prompt}\"\n\n"
                       "Give the video a single score for its {dimension}.")
UNIFIEDREWARD_PAIR = ("You are grading two generated videos, A and B. The prompt given to the video model was:\n"
                      "\"{prompt}\"\n\nWhich video is better in {dimension}?")

# A custom point template's pairwise counterpart (a custom template may name one with ``pair_template``).
GENERIC_PAIR = ("Two videos, A and B, were generated for the prompt:\n\"{prompt}\"\n\n"
                "Which video is better in {dimension}?")

STYLES = {
    "videoscore2": (VIDEOSCORE2_POINT, VIDEOSCORE2_PAIR, VIDEOSCORE2_DIMENSIONS),
    "unifiedreward": (UNIFIEDREWARD_POINT, UNIFIEDREWARD_PAIR, UNIFIEDREWARD_DIMENSIONS),
}

# Labels placed before each video of a pairwise prompt.
VIDEO_A, VIDEO_B = "Video A:", "Video B:"


def answer_instruction(answer: str, rating_scale: list[str], chain_of_thought: bool) -> str:
    """The line asking for the answer: the tokens the judge reads the score from, named explicitly."""
    if answer == "rating":
        what = f"one number from {', '.join(rating_scale)} ({rating_scale[0]} is worst, {rating_scale[-1]} is best)"
    elif answer == "yes_no":
        what = "Yes if it is good in this aspect, No if it is not"
    else:  # pair
        what = "A or B"
    if chain_of_thought:
        return f"Think it through briefly first, then end with your answer: {what}."
    return f"Answer with {what} only."


# Appended after a chain-of-thought rationale: the answer then starts a new line, so the answer tokens are the same
# bare strings ("4", "Yes", "A") as at the start of a direct reply.
SCORE_CUE = "\n\nFinal answer:\n"


def fill(template: str, prompt: str, dimension: str) -> str:
    """``template`` with ``{dimension}`` then ``{prompt}`` substituted (no other field is interpreted; a prompt that
    itself holds ``{dimension}`` stays as written)."""
    return template.replace(DIMENSION_FIELD, dimension).replace(PROMPT_FIELD, prompt)
