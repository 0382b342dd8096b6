from surgvqa.cli import main

main()
