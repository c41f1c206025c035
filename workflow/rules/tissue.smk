def download_input(wildcards):
    """Local sources are real inputs (so a rule can make them, e.g. the demo slides)."""
    source = SLIDE_ROWS[wildcards.slide_id]["source"]
    if "://" in source or _is_uuid(source):
        return []
    return [source]


def _is_uuid(text):
    # nucseg.download.fetch.UUID_RE's test, repeated: planning runs without nucseg installed (common.smk).
    return re.fullmatch(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}", text) is not None


def download_args(row):
    args = [f"--api-url={config['gdc']['api_url']}", f"--retries={config['download']['retries']}",
            f"--on-failure={config['download']['on_failure']}"]
    if row.get("file_name"):
        args.append(f"--file-name={row['file_name']}")
    if row.get("md5"):
        args.append(f"--md5={row['md5']}")
    if row.get("size"):
        args.append(f"--size={int(float(row['size']))}")
    if not config["download"]["link_local"]:
        args.append("--copy")
    return args


def tissue_params(wildcards):
    """The slide's sheet-derived arguments in one input function (each one costs planning time per job)."""
    row = SLIDE_ROWS[wildcards.slide_id]
    return {"source": f"--source={row['source']}", "download": download_args(row), "mpp": mpp_args(wildcards.slide_id)}


rule tissue:
    """Fetch the slide (GDC, URL or local path; verified), then detect tissue and run WSI QC.

    One job per slide for both steps: planning time grows with jobs per slide (docs/cluster.md).
    A bad slide is recorded in wsi.json (status failed, failure_stage, failure_reason), not a failed job.
    """
    input:
        download_input,
    output:
        slide=directory(slide_path("{cancer_type}", "{slide_id}")) if config["keep_slides"] else temp(directory(slide_path("{cancer_type}", "{slide_id}"))),
        polygons="results/{cancer_type}/{slide_id}/tissue.parquet",
        preview="results/{cancer_type}/{slide_id}/tissue.png",
        tiles="results/{cancer_type}/{slide_id}/tiles.parquet",
        patches="results/{cancer_type}/{slide_id}/patches.npz",
        facts="results/{cancer_type}/{slide_id}/wsi.json",
    params:
        slide=tissue_params,
        out_dir=lambda wc: slide_dir(wc.cancer_type, wc.slide_id),
        args=[f"--mpp-work={config['mpp_work']}", *cfg_args(config["tissue"])],
    log:
        "logs/tissue/{cancer_type}/{slide_id}.log",
    resources:
        gdc_connections=1,
    retries: 2
    conda:
        "../../envs/nucseg.yaml"
    shell:
        "(nucseg --no-progress download {params.slide[source]:q} --out-dir {output.slide:q} "
        "--slide-id={wildcards.slide_id:q} {params.slide[download]:q} && "
        "nucseg --no-progress tissue {output.slide:q} --out-dir {params.out_dir:q} "
        "--slide-id={wildcards.slide_id:q} {params.slide[mpp]:q} {params.args:q}) "
        "> {log:q} 2>&1"
