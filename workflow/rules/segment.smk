SEGMENT_CONFIG_HASH = config_hash("mpp_work", "model", segment=SEGMENT_SETTINGS)


rule segment:
    """Segment every nucleus of the slide, then measure QC signals on sampled patches.

    Both steps run the network on the GPU, so they share one job; the QC grading levels are applied
    later, at aggregation (qc_cohort), so changing a level re-grades without running this again.
    """
    input:
        slide=slide_path("{cancer_type}", "{slide_id}"),
        tissue="results/{cancer_type}/{slide_id}/tissue.parquet",
        tiles="results/{cancer_type}/{slide_id}/tiles.parquet",
        facts="results/{cancer_type}/{slide_id}/wsi.json",
        weights=model_weights(),
    output:
        nuclei="results/{cancer_type}/{slide_id}/nuclei.parquet",
        row="results/{cancer_type}/{slide_id}/qc.json",
        patches="results/{cancer_type}/{slide_id}/qc_patches.parquet",
        overlay="results/{cancer_type}/{slide_id}/qc_overlay.png",
    params:
        slide=lambda wc: {"source": SLIDE_ROWS[wc.slide_id]["source"], "mpp": mpp_flags(wc.slide_id),
                          "type": SLIDE_ROWS[wc.slide_id].get("slide_type", "")},
        # Static flags in one string each: every {field} of the command costs planning time per job.
        flags=f"--config-hash {SEGMENT_CONFIG_HASH} {cfg_flags(SEGMENT_SETTINGS)}",
        qc=f"--backend {config['slide_backend']} --config-hash {SEGMENT_CONFIG_HASH} {qc_flags(measure=True)}",
    threads: SEGMENT_RUNTIME["workers"] + SEGMENT_RUNTIME["postprocess_workers"]
    resources:
        mem_mb=lambda wc, attempt: 3000 * attempt,
        gpu=config["gpus_per_job"],
        segment_readers=SEGMENT_RUNTIME["workers"],
        segment_postprocess=SEGMENT_RUNTIME["postprocess_workers"],
        segment_batch=SEGMENT_RUNTIME["batch_size"],
    retries: 1
    log:
        "logs/segment/{cancer_type}/{slide_id}.log",
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "(nucseg --no-progress segment {input.slide} --out {output.nuclei} --checkpoint {input.weights} "
        "--tissue-mask {input.tissue} --slide-id {wildcards.slide_id} --slide-type '{params.slide[type]}' "
        "{params.slide[mpp]} {params.flags} "
        "--workers {resources.segment_readers} --postprocess-workers {resources.segment_postprocess} "
        "--batch-size {resources.segment_batch} && "
        "nucseg --no-progress qc --wsi {input.facts} --nuclei {output.nuclei} --tiles {input.tiles} "
        "--slide {input.slide} --out-json {output.row} --out-patches {output.patches} "
        "--checkpoint {input.weights} --tissue {input.tissue} --out-overlay {output.overlay} "
        "--cancer-type {wildcards.cancer_type} --source '{params.slide[source]}' {params.qc}) > {log} 2>&1"
