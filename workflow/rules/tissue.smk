def download_input(wildcards):
    """Local sources are real inputs (so a rule can make them, e.g. the demo slides)."""
    source = SLIDE_ROWS[wildcards.slide_id]["source"]
    if "://" in source or _is_uuid(source):
        return []
    return [source]


def _is_uuid(text):
    import re

    return re.fullmatch(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}", text) is not None


def download_flags(row):
    flags = [f"--api-url {config['gdc']['api_url']}", f"--retries {config['download']['retries']}",
             f"--on-failure {config['download']['on_failure']}"]
    if row.get("md5"):
        flags.append(f"--md5 {row['md5']}")
    if row.get("size"):
        flags.append(f"--size {int(float(row['size']))}")
    if not config["download"]["link_local"]:
        flags.append("--copy")
    return " ".join(flags)


def tissue_params(wildcards):
    """The slide's sheet-derived flags in one input function (each one costs planning time per job)."""
    row = SLIDE_ROWS[wildcards.slide_id]
    return {"source": row["source"], "download": download_flags(row), "mpp": mpp_flags(wildcards.slide_id)}


rule tissue:
    """Fetch the slide (GDC, URL or local path; verified), then detect tissue and run WSI QC.

    One job per slide for both steps: planning time grows with jobs per slide (README "Planning at scale").
    """
    input:
        download_input,
    output:
        slide=slide_path("{cancer_type}", "{slide_id}") if config["keep_slides"] else temp(slide_path("{cancer_type}", "{slide_id}")),
        polygons="results/{cancer_type}/{slide_id}/tissue.parquet",
        preview="results/{cancer_type}/{slide_id}/tissue.png",
        tiles="results/{cancer_type}/{slide_id}/tiles.parquet",
        patches="results/{cancer_type}/{slide_id}/patches.npz",
        facts="results/{cancer_type}/{slide_id}/wsi.json",
    params:
        slide=tissue_params,
        flags=f"--mpp-work {config['mpp_work']} {cfg_flags(config['tissue'])}",
    log:
        "logs/tissue/{cancer_type}/{slide_id}.log",
    resources:
        gdc_connections=1,
    retries: 2
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "(nucseg --no-progress download --source '{params.slide[source]}' --out {output.slide} "
        "--slide-id {wildcards.slide_id} {params.slide[download]} && "
        "nucseg --no-progress tissue {output.slide} --out-dir $(dirname {output.facts}) "
        "--slide-id {wildcards.slide_id} {params.slide[mpp]} {params.flags}) "
        "> {log} 2>&1"
