"""Mirror of the part of modules.sd_hijack we read: ``model_hijack.embedding_db``, the
textual-inversion database (``modules/textual_inversion/textual_inversion.py``): ``word_embeddings``
maps each loaded embedding's name to an ``Embedding`` whose ``vectors`` is its number of vectors."""


class Embedding:
    def __init__(self, vec, name, step=None):
        self.vec = vec
        self.name = name
        self.step = step
        self.vectors = 0 if vec is None else int(vec.shape[0])


class EmbeddingDatabase:
    def __init__(self):
        self.word_embeddings = {}
        self.skipped_embeddings = {}

    def register_embedding(self, embedding, model=None):
        self.word_embeddings[embedding.name] = embedding
        return embedding


class StableDiffusionModelHijack:
    def __init__(self):
        self.embedding_db = EmbeddingDatabase()


model_hijack = StableDiffusionModelHijack()
