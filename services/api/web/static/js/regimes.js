// The guidance regimes, in the words of the teaching text the project started from.

export const SWEEP_SCALES = [0, 1, 3, 7.5, 15];

const WORDS = {
  ignored: "When scale=0, the prompt is ignored.",
  low: "Model is barely listening to the prompt. Result: generally aesthetic but off-topic.",
  plain: "When scale=1, you get standard conditional generation.",
  pushed: "When scale > 1, you push the denoising more strongly in the prompt direction.",
  balanced:
    "Model balances prompt-following with sample diversity. 7.5 is the default for Stable Diffusion.",
  fried:
    "Model is forced to maximize prompt adherence at every step. Result: oversaturated colors, hard edges, " +
    "'fried' look. Often artifact-heavy. Use sparingly.",
};

/** {label, words} for a guidance scale. */
export function regimeFor(scale) {
  if (scale === 0) return { label: "prompt ignored", words: `${WORDS.ignored} ${WORDS.low}` };
  if (scale < 1) return { label: "barely listening", words: WORDS.low };
  if (scale === 1) return { label: "plain conditional", words: WORDS.plain };
  if (scale < 5) return { label: "balanced", words: WORDS.pushed };
  if (scale <= 10) return { label: "balanced", words: WORDS.balanced };
  return { label: "over-saturated", words: WORDS.fried };
}
