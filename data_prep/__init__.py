"""FineWeb-Edu download and GPT-2 tokenization into uint16 token shards on any fsspec store."""
