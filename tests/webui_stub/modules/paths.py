import os
import tempfile

data_path = os.environ.get("LORACLR_STUB_DATA", tempfile.gettempdir())
models_path = os.path.join(data_path, "models")
script_path = data_path
