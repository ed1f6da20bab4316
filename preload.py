"""Command-line options of sd-webui-loraclr (A1111 calls ``preload(parser)`` before parsing)."""


def preload(parser):
    parser.add_argument(
        "--loraclr-merge-dir",
        type=str,
        default=None,
        help="folder where LoRACLR merges are saved (default: the checkpoint folder, --ckpt-dir if set)",
    )
    parser.add_argument(
        "--loraclr-device",
        type=str,
        default=None,
        help="device for the LoRACLR optimiser, e.g. cuda, cuda:1 or cpu (default: the WebUI's device)",
    )
    parser.add_argument(
        "--loraclr-dtype",
        type=str,
        default=None,
        choices=["fp16", "fp32"],
        help="default dtype of saved merges (default: fp16)",
    )
