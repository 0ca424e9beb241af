from onecard_admin.cli import main

main()
