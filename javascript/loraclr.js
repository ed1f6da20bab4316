// sd-webui-loraclr: tooltips for every option, and "send a LoRA card to the merge tab".
// The Merge button: a task id for the WebUI's progress bar (as its own checkpoint merger does).
function loraclr_merge_submit() {
    const id = randomId();
    requestProgress(id, gradioApp().getElementById("loraclr_merge_results_panel"), null, function () {});
    const res = create_submit_args(arguments);
    res[0] = id;
    return res;
}

// "Load it now": switch the checkpoint through the WebUI's own selector (quicksettings stay in sync).
function loraclr_load_merged(title) {
    if (title) selectCheckpoint(title);
    return [title];
}

(function () {
    const tips = {
        loraclr_merge_base: "Checkpoint the LoRAs are merged into. '(loaded model)' uses the model in memory; any other loads a copy on the side when memory allows.",
        loraclr_merge_tags: "Paste <lora:NAME:WEIGHT> tags (e.g. from a prompt); one concept row is made per LoRA.",
        loraclr_merge_concepts: "One row per LoRA: weight and the concept/trigger text it is merged for (pre-filled from its activation text).",
        loraclr_merge_method: "LoRACLR: contrastive merge (paper). Least squares: closed-form fusion. Naive sum / Average: what plain merge tools do, for comparison.",
        loraclr_merge_groups: "Layer groups merged by the chosen method; the others take the weighted sum.",
        loraclr_merge_iterations: "AdamW iterations of the contrastive objective per layer (paper: 50).",
        loraclr_merge_lr: "AdamW learning rate (paper: 1e-4).",
        loraclr_merge_margin: "Contrastive margin: other concepts' outputs are pushed at least this far away (paper: 0.5).",
        loraclr_merge_lambda_delta: "Weight of the ||W' - W|| regulariser (paper: 0.001).",
        loraclr_merge_lambda_mse: "Weight of the fidelity (MSE) term (paper: 0.1).",
        loraclr_merge_seed: "Seed of the feature sampling run; the merge is deterministic for a seed on CPU.",
        loraclr_merge_steps: "Sampling steps recorded for spatial-layer features (paper: 20).",
        loraclr_merge_resolution: "Image size of the feature sampling run; empty or 0: the model's own (512 for SD1.5, as the paper).",
        loraclr_merge_lsq_init: "Start the contrastive optimiser from the least-squares fusion instead of the base weights.",
        loraclr_merge_lambda_con: "Weight of the contrastive (margin) term (paper: 1).",
        loraclr_merge_weight_decay: "AdamW weight decay (reference code: 1e-4).",
        loraclr_merge_cfg_scale: "CFG scale of the feature sampling run (reference code: 7.5).",
        loraclr_merge_picker: "Pick a LoRA from the WebUI's list; its tag is added with its preferred weight.",
        loraclr_merge_refresh: "Rescan the checkpoint and LoRA folders.",
        loraclr_merge_interrupt: "Stop the merge; nothing is written and the loaded model stays as it was.",
        loraclr_merge_output_name: "File name in the checkpoint folder; letters, digits, spaces and . _ - ( ) [ ] + only.",
        loraclr_merge_overwrite: "Replace an existing file of that name.",
        loraclr_merge_dtype: "Precision of the saved checkpoint.",
        loraclr_merge_lora_rank: "Also save the merge as a LoRA of this rank (0 = no).",
        loraclr_merge_run: "Merge and save; the fidelity report appears below.",
        loraclr_merge_load: "Load the merged checkpoint now.",
    };
    // The CLoRA accordion exists on both tabs; the WebUI names its elements script_<tab>_<title>_<field>.
    const cloraTips = {
        enabled: "Compose: each <lora:NAME:W> written right before a word is applied only to that subject's region.",
        step_mode: "paper: the reference's fixed step on the gradient; relative: each update moves the latent by a fixed fraction of its norm (the same at every resolution); masks-only: no update, only the masked fusion (fastest).",
        relative_step: "With the relative latent update: its size as a fraction of the latent's norm.",
        map_level: "Resolution of the attention maps and masks: the paper's W/32 (16x16 at 512 px); auto is W/32 unless that is under 8x8, then finer.",
        step_size: "Size of each contrastive latent update in paper mode (paper: 20).",
        max_step: "Latent updates run at steps before this one (paper: 25 of 50).",
        refine_steps: "Steps at which the update is repeated (paper: 0,10,20).",
        refine_iterations: "Repeats at those steps (paper: 20).",
        temperature: "Temperature of the contrastive (NT-Xent) loss (paper: 0.5).",
        mask_threshold: "A concept's mask: pixels whose attention is at least this fraction of its maximum.",
        mask_from_step: "Masked fusion starts at this step; before it the base prediction is used.",
        morphology: "Clean-up of the masks with a 3x3 filter.",
        reuse_prediction: "Paper behaviour: denoise with the prediction made before the latent update (one pass less).",
        cond_only_loss: "Compute the contrastive loss on the prompt half only: faster, a deviation from the paper.",
        show_masks: "Add the concept masks to the output gallery.",
    };
    for (const tab of ["txt2img", "img2img"]) {
        for (const [field, text] of Object.entries(cloraTips)) tips["script_" + tab + "_clora_composition_" + field] = text;
    }

    function applyTips() {
        for (const [id, text] of Object.entries(tips)) {
            const el = gradioApp().getElementById(id);
            if (el && !el.title) el.title = text;
        }
    }

    // Ctrl+click on a LoRA card (txt2img/img2img Lora tab) appends its tag to the merge tab instead of the prompt.
    function sendCardToMerge(event) {
        const card = event.target.closest(".card");
        const tab = gradioApp().getElementById("tab_loraclr_merge");
        if (!card || !event.ctrlKey || !tab) return;
        const name = card.dataset.name;
        const box = gradioApp().querySelector("#loraclr_merge_tags textarea");
        if (!name || !box) return;
        box.value = (box.value + " <lora:" + name + ":1>").trim();
        updateInput(box);
        event.stopPropagation();
    }

    onUiLoaded(function () {
        applyTips();
        gradioApp().addEventListener("click", sendCardToMerge, true);
    });
    onUiUpdate(applyTips);
})();
