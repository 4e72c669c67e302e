from transformers import CLIPTokenizer

from training.shapes import all_captions
from training.vocab import MODEL_MAX_LENGTH, caption_words, write_tokenizer


def test_tokenizer_round_trips_and_keeps_words_whole(tmp_path):
    write_tokenizer(tmp_path / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert tokenizer.model_max_length == MODEL_MAX_LENGTH
    for word in caption_words():
        assert tokenizer.tokenize(word) == [word + "</w>"]
    for caption in all_captions():
        ids = tokenizer(caption).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert len(ids) == len(caption.split()) + 2 <= MODEL_MAX_LENGTH
        assert tokenizer.unk_token_id not in ids[1:-1]
