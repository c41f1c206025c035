SEGMENT_CONFIG_HASH = config_hash(segment=SEGMENT_SETTINGS, weights=base_weights(), adapt=config["model"]["adapt"])


def segment_params(wildcards):
    """The slide's sheet-derived arguments in one input function (each one costs planning time per job)."""
    row = SLIDE_ROWS[wildcards.slide_id]
    return {"source": f"--source={row['source']}", "type": f"--slide-type={row.get('slide_type', '')}",
            "mpp": mpp_args(wildcards.slide_id)}


rule segment:
    """Segment every nucleus of the slide, then measure QC signals on sampled patches.

    Both steps run the network on the GPU, so they share one job; the QC grading levels are applied
    later, at aggregation (qc_cohort), so changing a level re-grades without running this again.
    An error on this slide is recorded in its nuclei.parquet metadata and qc.json, not a failed job.
    """
    input:
        slide=slide_path("{cancer_type}", "{slide_id}"),
        tissue="results/{cancer_type}/{slide_id}/tissue.parquet",
        tiles="results/{cancer_type}/{slide_id}/tiles.parquet",
        facts="results/{cancer_type}/{slide_id}/wsi.json",
        weights=lambda wc: model_weights(wc.cancer_type),
    output:
        nuclei="results/{cancer_type}/{slide_id}/nuclei.parquet",
        row="results/{cancer_type}/{slide_id}/qc.json",
        patches="results/{cancer_type}/{slide_id}/qc_patches.parquet",
        overlay="results/{cancer_type}/{slide_id}/qc_overlay.png",
    params:
        slide=segment_params,
        # Static arguments in one list each: every {field} of the command costs planning time per job.
        args=[f"--config-hash={SEGMENT_CONFIG_HASH}", *cfg_args(SEGMENT_SETTINGS)],
        qc=[f"--backend={config['slide_backend']}", f"--config-hash={SEGMENT_CONFIG_HASH}", *qc_args(measure=True)],
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
        "(nucseg --no-progress segment {input.slide:q} --out {output.nuclei:q} --checkpoint {input.weights:q} "
        "--tissue-mask {input.tissue:q} --slide-id={wildcards.slide_id:q} {params.slide[type]:q} "
        "{params.slide[mpp]:q} {params.args:q} "
        "--workers={resources.segment_readers} --postprocess-workers={resources.segment_postprocess} "
        "--batch-size={resources.segment_batch} && "
        "nucseg --no-progress qc --wsi {input.facts:q} --nuclei {output.nuclei:q} --tiles {input.tiles:q} "
        "--slide {input.slide:q} --out-json {output.row:q} --out-patches {output.patches:q} "
        "--checkpoint {input.weights:q} --tissue {input.tissue:q} --out-overlay {output.overlay:q} "
        "--cancer-type={wildcards.cancer_type:q} {params.slide[source]:q} {params.qc:q}) > {log:q} 2>&1"
