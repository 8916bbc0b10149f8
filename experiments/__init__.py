"""Lightning glue that fine-tunes T5 with peftcore on dialogue summarisation (TweetSumm)."""
